// The client in Node.js against the real Go servers (testserver): two
// entity-sync servers sharing an embedded nsqd, each behind a proxy the test
// can cut.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';

import { connect, State, EntitySyncError } from '../../src/index.js';
import { startTestServer, Recorder, awaitVersion } from '../helpers.js';

let srv;
before(async () => {
  srv = await startTestServer();
});
after(async () => {
  await srv?.stop();
});

let nextID = 0;
const uniqueID = (name) => `${name}-${++nextID}`;

/**
 * A WebSocket (the ws package's) that also records every frame about a key
 * it receives into frames: what the server actually sent, to tell a diff
 * from full rows and see an unchanged that reaches no callback.
 */
function recordingWebSocket(frames) {
  return class extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      this.on('message', (data) => {
        const f = JSON.parse(data.toString());
        if (f.key) frames.push(f);
      });
    }
  };
}

/** A client of server i, with fast reconnects and its states recorded. */
function client(i, extra = {}) {
  const states = new Recorder();
  const c = connect(srv.servers[i].ws, {
    WebSocket,
    minBackoff: 10,
    maxBackoff: 100,
    onStateChange: (state, info) => states.push({ kind: state, info }),
    ...extra,
  });
  return { c, states };
}

const bump = (server, id) => srv.control(`/bump?server=${server}&id=${encodeURIComponent(id)}`).then((r) => r.v);

test('initial state, then a change notified on the other server', async (t) => {
  const { c, states } = client(0);
  t.after(() => c.close());
  await states.until((e) => e.kind === State.CONNECTED, 'connected');
  assert.equal(c.state, State.CONNECTED);

  const id = uniqueID('a');
  const rec = new Recorder();
  c.subscribe('items', id, rec.handlers());
  const first = await rec.next('initial state');
  assert.equal(first.kind, 'rows');
  assert.deepEqual(first.rows, [{ entity: 'items', id, v: 0 }]);

  const seen = { last: 0 };
  for (let i = 0; i < 3; i++) {
    const v = await bump(1, id); // server 1 -> nsqd -> server 0 -> client
    await awaitVersion(rec, v, seen);
  }
});

test('duplicate subscriptions share one server subscription', async (t) => {
  const { c } = client(0);
  t.after(() => c.close());
  const id = uniqueID('dup');
  const a = new Recorder();
  const b = new Recorder();
  const unsubA = c.subscribe('items', id, (rows) => a.push({ kind: 'rows', rows }));
  await awaitVersion(a, 0);
  const unsubB = c.subscribe('items', id, (rows) => b.push({ kind: 'rows', rows }));
  await awaitVersion(b, 0); // from the client's cache

  let v = await bump(1, id);
  await awaitVersion(a, v);
  await awaitVersion(b, v);

  unsubA();
  unsubA();
  v = await bump(1, id);
  await awaitVersion(b, v);
  assert.deepEqual(a.drain(), []);

  unsubB();
  // Nothing is delivered after the last unsubscribe: a change of the key
  // followed by one of a fence key, whose arrival bounds the wait.
  const fence = new Recorder();
  const fenceID = uniqueID('fence');
  c.subscribe('items', fenceID, fence.handlers());
  await awaitVersion(fence, 0);
  await bump(1, id);
  await awaitVersion(fence, await bump(1, fenceID));
  assert.deepEqual(a.drain(), []);
  assert.deepEqual(b.drain(), []);
});

test('rows holding invalid UTF-8 arrive repaired and the connection stays up', async (t) => {
  // The ws package, like a browser, fails a connection on a text frame
  // that is not valid UTF-8 (RFC 6455, section 8.1).
  const { c, states } = client(0);
  t.after(() => c.close());
  await states.until((e) => e.kind === State.CONNECTED, 'connected');
  const id = uniqueID('latin1');
  const rec = new Recorder();
  c.subscribe('latin1', id, rec.handlers());
  const e = await rec.next('rows of latin1');
  assert.equal(e.kind, 'rows');
  assert.deepEqual(e.rows, [
    { id, name: 'caf\uFFFD' },
    { id, city: 'K\uFFFDln' },
  ]);
  // A change of another key arrives on the same connection: it was never
  // dropped.
  const fence = new Recorder();
  const fenceID = uniqueID('fence');
  c.subscribe('items', fenceID, fence.handlers());
  await awaitVersion(fence, await bump(1, fenceID));
  assert.deepEqual(states.drain(), []);
});

test('gone, and rows again when the item comes back', async (t) => {
  const { c } = client(0);
  t.after(() => c.close());
  const id = uniqueID('gone');
  const rec = new Recorder();
  c.subscribe('items', id, rec.handlers());
  await awaitVersion(rec, 0);
  await srv.control(`/delete?server=1&id=${id}`);
  assert.equal((await rec.next('gone')).kind, 'gone');
  const v = await bump(1, id);
  await awaitVersion(rec, v);
});

test('a refused subscription reports unknown_entity and the connection carries on', async (t) => {
  const errors = new Recorder();
  const { c } = client(0, { onError: (err) => errors.push({ kind: 'error', err }) });
  t.after(() => c.close());
  const bad = new Recorder();
  c.subscribe('nope', '1', bad.handlers());
  const e = await bad.next('error');
  assert.equal(e.kind, 'error');
  assert.ok(e.err instanceof EntitySyncError);
  assert.equal(e.err.code, 'unknown_entity');
  assert.deepEqual(e.err.key, { entity: 'nope', id: '1' });
  assert.equal(e.err.action, 'subscribe');

  // Without onError, the client's error listeners get it.
  c.subscribe('nope', '2', () => {});
  const e2 = await errors.next('client error');
  assert.equal(e2.err.code, 'unknown_entity');

  const good = new Recorder();
  c.subscribe('items', uniqueID('ok'), good.handlers());
  await awaitVersion(good, 0);
  assert.throws(() => c.subscribe('', 'x', () => {}), TypeError);
});

test('reconnects after the connection is cut and ends on the latest state', async (t) => {
  const { c, states } = client(0);
  t.after(async () => {
    c.close();
    await srv.control('/up?server=0');
  });
  const id1 = uniqueID('cut');
  const id2 = uniqueID('cut');
  const r1 = new Recorder();
  const r2 = new Recorder();
  c.subscribe('items', id1, r1.handlers());
  c.subscribe('items', id2, r2.handlers());
  const s1 = { last: -1 };
  const s2 = { last: -1 };
  await awaitVersion(r1, 0, s1);
  await awaitVersion(r2, 0, s2);
  await states.until((e) => e.kind === State.CONNECTED, 'connected');

  await srv.control('/cut?server=0&down=1'); // no close frame: a network failure
  await states.until((e) => e.kind === State.DISCONNECTED, 'disconnected');
  // Changed while the client is away: only resubscribing can deliver these.
  const v1 = await bump(1, id1);
  const v2 = await bump(1, id2);
  await states.until((e) => e.kind === State.DISCONNECTED, 'a failed attempt while down');
  await srv.control('/up?server=0');
  await states.until((e) => e.kind === State.CONNECTED, 'reconnected');
  await awaitVersion(r1, v1, s1);
  await awaitVersion(r2, v2, s2);

  await awaitVersion(r1, await bump(1, id1), s1);
});

test('reconnects after the server restarts (close code 1001)', async (t) => {
  const { c, states } = client(0);
  t.after(() => c.close());
  const id = uniqueID('restart');
  const rec = new Recorder();
  c.subscribe('items', id, rec.handlers());
  const seen = { last: -1 };
  await awaitVersion(rec, 0, seen);
  await states.until((e) => e.kind === State.CONNECTED, 'connected');

  await srv.control('/restart?server=0');
  const lost = await states.until((e) => e.kind === State.DISCONNECTED, 'disconnected');
  assert.equal(lost.info?.code, 1001);
  await states.until((e) => e.kind === State.CONNECTED, 'reconnected');
  await awaitVersion(rec, await bump(1, id), seen);
});

test('close stops reconnecting', async () => {
  const { c, states } = client(0);
  await states.until((e) => e.kind === State.CONNECTED, 'connected');
  c.close();
  assert.equal(c.state, State.CLOSED);
  assert.equal((await states.next('closed')).kind, State.CLOSED);
  assert.throws(() => c.subscribe('items', 'x', () => {}), /closed/);
  c.close();
});

test('a client holding more keys than the server burst resubscribes them all cleanly after a cut', async (t) => {
  const n = 130; // the server's defaults: 50 requests/s, burst 100
  const errors = new Recorder();
  const { c, states } = client(0, { onError: (err) => errors.push({ kind: 'error', err }) });
  t.after(async () => {
    c.close();
    await srv.control('/up?server=0');
  });
  await states.until((e) => e.kind === State.CONNECTED, 'connected');
  const ids = Array.from({ length: n }, () => uniqueID('many'));
  const recs = ids.map(() => new Recorder());
  const seen = ids.map(() => ({ last: -1 }));
  ids.forEach((id, i) => c.subscribe('items', id, recs[i].handlers()));
  for (let i = 0; i < n; i++) await awaitVersion(recs[i], 0, seen[i]);

  await srv.control('/cut?server=0&down=1');
  await states.until((e) => e.kind === State.DISCONNECTED, 'disconnected');
  const versions = [];
  for (const id of ids) versions.push(await bump(1, id)); // while away
  await srv.control('/up?server=0');
  await states.until((e) => e.kind === State.CONNECTED, 'reconnected');
  for (let i = 0; i < n; i++) await awaitVersion(recs[i], versions[i], seen[i]);
  // Every rate_limited refusal is reported to the 'error' listeners.
  assert.deepEqual(errors.drain().map((e) => `${e.err.code}: ${e.err.message}`), []);
  assert.deepEqual(states.drain(), []); // connected once, never dropped
});

// --- collections and resume ---

const listOp = (...args) => srv.list(...args);

/** Records onRows(rows, changes) and onGone(changes). */
function listHandlers(rec) {
  return {
    onRows: (rows, changes) => rec.push({ kind: 'rows', rows, changes }),
    onGone: (changes) => rec.push({ kind: 'gone', rows: [], changes }),
    onError: (err) => rec.push({ kind: 'error', err }),
  };
}

/** The next state must be exactly rows, with exactly changes. */
async function expectState(rec, rows, changes, what) {
  const e = await rec.next(what);
  assert.notEqual(e.kind, 'error', `${what}: ${e.err}`);
  assert.deepEqual(e.rows, rows, what);
  assert.deepEqual(e.changes, changes, what);
}

const find = (rows, id) => rows.find((r) => r.id === id);

test('a collection follows items added, changed, moved and removed on the other server, sent as diffs', async (t) => {
  const frames = new Recorder();
  const { c } = client(0, { WebSocket: recordingWebSocket(frames) });
  t.after(() => c.close());
  const list = uniqueID('list');
  let rows = await listOp(1, list, 'fill', { n: 12, text: 'an item of the list' });
  const rec = new Recorder();
  c.subscribe('lists', list, listHandlers(rec));
  await expectState(rec, rows, rows.map((row) => ({ type: 'added', id: row.id, row })), 'the initial rows');

  rows = await listOp(1, list, 'add', { item: 'new', text: 'added at the end' });
  await expectState(rec, rows, [{ type: 'added', id: 'new', row: find(rows, 'new') }], 'add');
  rows = await listOp(1, list, 'add', { item: 'second', text: 'added second', at: 1 });
  await expectState(rec, rows, [{ type: 'added', id: 'second', row: find(rows, 'second') }], 'insert');
  rows = await listOp(1, list, 'set', { item: 'i3', text: 'changed' });
  await expectState(rec, rows, [{ type: 'modified', id: 'i3', row: find(rows, 'i3') }], 'set');
  const old = find(rows, 'i5');
  rows = await listOp(1, list, 'remove', { item: 'i5' });
  await expectState(rec, rows, [{ type: 'removed', id: 'i5', row: old }], 'remove');
  rows = await listOp(1, list, 'move', { item: 'i0', at: 6 });
  await expectState(rec, rows, [], 'move: new order, no row changed');

  // What the server sent: the full rows once, then differences only.
  const sent = frames.drain().filter((f) => f.key.id === list);
  assert.deepEqual(sent.map((f) => f.type), ['rows', 'diff', 'diff', 'diff', 'diff', 'diff']);
  assert.equal(sent[0].ids.length, 12);
  for (let i = 1; i < sent.length; i++) assert.equal(sent[i].base, sent[i - 1].version, `diff ${i} applies to the state before it`);
  assert.deepEqual(sent.at(-1).order, rows.map((r) => r.id), 'a move sends the order');

  // Emptied: gone, its last rows removed.
  for (const row of rows) await listOp(1, list, 'remove', { item: row.id });
  const last = await rec.until((e) => e.kind === 'gone', 'the empty list');
  assert.deepEqual(last.changes.at(-1), { type: 'removed', id: rows.at(-1).id, row: rows.at(-1) });
});

test('resume: a reconnect with nothing changed costs no rows and no callback; changes made while away arrive as changes', async (t) => {
  const frames = new Recorder();
  const { c, states } = client(0, { WebSocket: recordingWebSocket(frames) });
  t.after(async () => {
    c.close();
    await srv.control('/up?server=0');
  });
  const list = uniqueID('resume');
  const item = uniqueID('resume-item');
  let rows = await listOp(1, list, 'fill', { n: 8, text: 'row' });
  const rec = new Recorder();
  const plain = new Recorder();
  c.subscribe('lists', list, listHandlers(rec));
  c.subscribe('items', item, plain.handlers());
  await rec.next('the initial rows');
  await awaitVersion(plain, 0);
  await states.until((e) => e.kind === State.CONNECTED, 'connected');
  frames.drain();

  /** Cuts server 0, runs whileAway, restores it and waits until reconnected. */
  async function away(whileAway) {
    await srv.control('/cut?server=0&down=1');
    await states.until((e) => e.kind === State.DISCONNECTED, 'disconnected');
    await whileAway();
    await srv.control('/up?server=0');
    await states.until((e) => e.kind === State.CONNECTED, 'reconnected');
  }

  // Nothing changed: both keys answered unchanged.
  await away(async () => {});
  // The two answers come in either order (each key may need a fetch first).
  const answers = new Map();
  while (answers.size < 2) {
    const f = await frames.until((f) => f.key.id === list || f.key.id === item, 'the answers for the list and the item');
    answers.set(f.key.id, f);
  }
  assert.equal(answers.get(list).type, 'unchanged');
  assert.equal(answers.get(item).type, 'unchanged');
  // The next callback is the next change: the unchanged frames ran none.
  rows = await listOp(1, list, 'set', { item: 'i1', text: 'after the reconnect' });
  await expectState(rec, rows, [{ type: 'modified', id: 'i1', row: find(rows, 'i1') }], 'the change after unchanged');
  await awaitVersion(plain, await bump(1, item));

  // Changed while away: exactly those changes, whatever the server sends.
  const gone = find(rows, 'i4');
  await away(async () => {
    await listOp(1, list, 'set', { item: 'i2', text: 'changed while away' });
    await listOp(1, list, 'remove', { item: 'i4' });
    rows = await listOp(1, list, 'add', { item: 'x', text: 'added while away', at: 0 });
  });
  await expectState(rec, rows, [
    { type: 'removed', id: 'i4', row: gone },
    { type: 'added', id: 'x', row: find(rows, 'x') },
    { type: 'modified', id: 'i2', row: find(rows, 'i2') },
  ], 'the changes made while away');

  // A fresh server process never saw this list: the version, a hash of the
  // rows, is still the same, so it answers unchanged.
  frames.drain();
  await srv.control('/restart?server=0');
  await states.until((e) => e.kind === State.DISCONNECTED, 'disconnected by the restart');
  await states.until((e) => e.kind === State.CONNECTED, 'reconnected to the new server');
  assert.equal((await frames.until((f) => f.key.id === list, 'the answer for the list')).type, 'unchanged');
  rows = await listOp(1, list, 'move', { item: 'x', at: 7 });
  await expectState(rec, rows, [], 'a move after the restart');
  assert.deepEqual(rec.drain(), []);
});

test('randomized: clients on both servers, cut at random, end on the list as fetched, and their changes replay to their rows', async (t) => {
  const list = uniqueID('random');
  let seed = Number(process.env.ES_SEED) || Date.now() % 100000;
  t.diagnostic(`ES_SEED=${seed}`);
  const rand = () => {
    seed = (seed * 1103515245 + 12345) % 2147483648;
    return seed / 2147483648;
  };
  // Rows as a text that ignores their order.
  const byID = (rows) => JSON.stringify([...rows].sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0)));
  const frames = new Recorder();
  const readers = [0, 0, 1].map((server) => {
    const { c } = client(server, { WebSocket: recordingWebSocket(frames) });
    const r = { c, rows: null, model: new Map(), events: new Recorder(), problems: [] };
    // The application's view built from the changes alone must be the rows.
    const apply = (rows, changes) => {
      for (const { type, id, row } of changes) {
        if (type === 'removed') {
          if (!r.model.delete(id)) r.problems.push(`removed ${id}, not held`);
        } else {
          if (r.model.has(id) !== (type === 'modified')) r.problems.push(`${type} ${id}, held: ${r.model.has(id)}`);
          r.model.set(id, row);
        }
      }
      const view = byID([...r.model.values()]);
      if (view !== byID(rows)) r.problems.push(`view from the changes ${view}, rows ${byID(rows)}`);
      r.rows = rows;
      r.events.push({ rows });
    };
    c.subscribe('lists', list, { onRows: apply, onGone: (changes) => apply([], changes), onError: (err) => r.problems.push(String(err)) });
    return r;
  });
  t.after(() => readers.forEach((r) => r.c.close()));

  let rows = await srv.list(1, list, 'fill', { n: 20, text: 'start' });
  let next = 0;
  for (let i = 0; i < 150; i++) {
    const server = rand() < 0.5 ? 0 : 1;
    const p = rand();
    const pick = () => rows[Math.floor(rand() * rows.length)].id;
    if (p < 0.3 || rows.length < 3) {
      rows = await srv.list(server, list, 'add', { item: `n${++next}`, text: `new ${next}`, at: Math.floor(rand() * (rows.length + 1)) });
    } else if (p < 0.6) {
      rows = await srv.list(server, list, 'set', { item: pick(), text: `edit ${i}` });
    } else if (p < 0.8) {
      rows = await srv.list(server, list, 'remove', { item: pick() });
    } else if (p < 0.95) {
      rows = await srv.list(server, list, 'move', { item: pick(), at: Math.floor(rand() * rows.length) });
    } else {
      await srv.control('/cut?server=0'); // every connection to server 0 drops; they reconnect
    }
    if (rand() < 0.2) await new Promise((res) => setTimeout(res, rand() * 20)); // let some states through, coalesce others
  }

  const want = JSON.stringify(rows);
  for (const [i, r] of readers.entries()) {
    while (JSON.stringify(r.rows) !== want) await r.events.next(`reader ${i} to reach the final list`);
    assert.deepEqual(r.problems, [], `reader ${i}`);
    assert.equal(byID([...r.model.values()]), byID(rows), `reader ${i}: its view from the changes`);
  }
  const sent = {};
  for (const f of frames.drain()) if (f.key.id === list) sent[f.type] = (sent[f.type] ?? 0) + 1;
  t.diagnostic(`frames received: ${JSON.stringify(sent)}`);
});
