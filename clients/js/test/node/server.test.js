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
