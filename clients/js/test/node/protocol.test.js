// The client against a scripted server (the ws package's WebSocketServer),
// for protocol situations a real server produces only in races or through
// features the test cannot trigger at will: out-of-order seq numbers,
// revocation, refusals, rate limiting. Also checks the exact requests sent.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket, { WebSocketServer } from 'ws';

import { connect, State, SUBPROTOCOL } from '../../src/index.js';
import { Recorder } from '../helpers.js';

/** The welcome of a scripted server: an older server's, with no rate limits and no heartbeat. */
const DEFAULT_WELCOME = { type: 'welcome', protocol: SUBPROTOCOL, limits: { maxFrameBytes: 32768 } };

/**
 * A scripted server; each connection is handed to the test via accept().
 * welcome is the first frame of every connection; setWelcome changes it for
 * later ones. Each connection and request records its arrival time (`at`,
 * performance.now()).
 */
async function fakeServer(t, { subprotocol = true, welcome = DEFAULT_WELCOME } = {}) {
  const wss = new WebSocketServer({
    host: '127.0.0.1',
    port: 0,
    handleProtocols: (protocols) => (subprotocol && protocols.has(SUBPROTOCOL) ? SUBPROTOCOL : false),
  });
  await new Promise((res) => wss.once('listening', res));
  const conns = new Recorder();
  wss.on('connection', (ws) => {
    const at = performance.now();
    const reqs = new Recorder();
    ws.on('message', (data) => reqs.push({ ...JSON.parse(data.toString()), at: performance.now() }));
    const fc = {
      ws,
      at,
      send: (v) => ws.send(JSON.stringify(v)),
      /** The next request; must have this action (and key). */
      async expect(action, key) {
        const r = await reqs.next(`${action} ${JSON.stringify(key ?? '')}`);
        assert.equal(r.action, action, `got ${JSON.stringify(r)}`);
        if (key) assert.deepEqual(r.body, key);
        assert.ok(r.ref, 'request carries a ref');
        return r;
      },
      ack: (r) => fc.send({ type: 'ack', ref: r.ref }),
      rows: (key, seq, ...rows) => fc.send({ type: 'rows', key, seq, rows }),
      gone: (key, seq) => fc.send({ type: 'gone', key, seq }),
      drain: () => reqs.drain(),
    };
    fc.send(welcome);
    conns.push(fc);
  });
  t.after(async () => {
    for (const ws of wss.clients) ws.terminate();
    await new Promise((res) => wss.close(res));
  });
  const url = `ws://127.0.0.1:${wss.address().port}/ws/entity-sync/`;
  return {
    url,
    accept: () => conns.next('a connection'),
    setWelcome: (w) => {
      welcome = w;
    },
  };
}

function client(t, url, extra = {}) {
  const states = new Recorder();
  const c = connect(url, {
    WebSocket,
    minBackoff: 5,
    maxBackoff: 50,
    // at: when the client reported it (the test may resume later).
    onStateChange: (state, info) => states.push({ kind: state, info, at: performance.now() }),
    ...extra,
  });
  t.after(() => c.close());
  return { c, states };
}

const key = (id) => ({ entity: 'items', id });

async function expectRows(rec, value) {
  const e = await rec.next(`rows ${JSON.stringify(value)}`);
  assert.equal(e.kind, 'rows', `got ${JSON.stringify(e)}`);
  assert.deepEqual(e.rows, [value]);
}

test('a stale seq is dropped; numbering restarts on a new connection', async (t) => {
  const f = await fakeServer(t);
  const { c, states } = client(t, f.url);
  const rec = new Recorder();
  c.subscribe('items', '1', rec.handlers());
  let fc = await f.accept();
  fc.ack(await fc.expect('subscribe', key('1')));
  fc.rows(key('1'), 5, 'v5');
  fc.rows(key('1'), 3, 'v3'); // older: dropped
  fc.rows(key('1'), 5, 'v5 again'); // same: dropped
  fc.gone(key('1'), 6);
  fc.rows(key('1'), 4, 'v4');
  fc.rows(key('1'), 7, 'v7');
  await expectRows(rec, 'v5');
  assert.equal((await rec.next('gone')).kind, 'gone');
  await expectRows(rec, 'v7');

  fc.ws.terminate();
  await states.until((e) => e.kind === State.DISCONNECTED, 'disconnected');
  fc = await f.accept();
  fc.ack(await fc.expect('subscribe', key('1')));
  fc.rows(key('1'), 1, 'new v1');
  await expectRows(rec, 'new v1');
});

test('duplicate subscriptions: one subscribe, one unsubscribe after the last', async (t) => {
  const f = await fakeServer(t);
  const { c } = client(t, f.url);
  const fc = await f.accept();
  const a = new Recorder();
  const b = new Recorder();
  const unsubA = c.subscribe('items', '1', a.handlers());
  fc.ack(await fc.expect('subscribe', key('1')));
  fc.rows(key('1'), 1, 'one');
  await expectRows(a, 'one');
  const unsubB = c.subscribe('items', '1', b.handlers());
  await expectRows(b, 'one'); // from the cache, no request
  unsubA();
  unsubB();
  fc.ack(await fc.expect('unsubscribe', key('1')));
  c.subscribe('items', 'fence', () => {});
  await fc.expect('subscribe', key('fence')); // nothing in between
  assert.deepEqual(a.drain(), []);
  assert.deepEqual(b.drain(), []);
});

test('resubscribing while the unsubscribe is in flight accepts the new numbering', async (t) => {
  const f = await fakeServer(t);
  const { c } = client(t, f.url);
  const fc = await f.accept();
  const r1 = new Recorder();
  const unsub = c.subscribe('items', '1', r1.handlers());
  fc.ack(await fc.expect('subscribe', key('1')));
  fc.rows(key('1'), 5, 'old 5');
  await expectRows(r1, 'old 5');

  unsub();
  const unsubReq = await fc.expect('unsubscribe', key('1'));
  const r2 = new Recorder();
  c.subscribe('items', '1', r2.handlers());
  const subReq = await fc.expect('subscribe', key('1'));
  fc.rows(key('1'), 6, 'old 6'); // written before the server saw the unsubscribe
  fc.rows(key('1'), 1, 'new 1'); // the new server subscription starts at 1
  fc.ack(unsubReq);
  fc.ack(subReq);
  fc.rows(key('1'), 2, 'new 2');
  fc.rows(key('1'), 2, 'new 2 again'); // strict again
  await expectRows(r2, 'old 6');
  await expectRows(r2, 'new 1');
  await expectRows(r2, 'new 2');
  const fence = new Recorder();
  c.subscribe('items', 'fence', fence.handlers());
  fc.ack(await fc.expect('subscribe', key('fence')));
  fc.rows(key('fence'), 1, 'f');
  await expectRows(fence, 'f');
  assert.deepEqual(r2.drain(), []);
  assert.deepEqual(r1.drain(), []);
});

test('revoked ends the subscription; it is not sent again on reconnect', async (t) => {
  const f = await fakeServer(t);
  const { c, states } = client(t, f.url);
  let fc = await f.accept();
  const full = new Recorder();
  const goneOnly = new Recorder();
  const pub = new Recorder();
  c.subscribe('items', 'secret', full.handlers());
  c.subscribe('items', 'secret', () => {}, () => goneOnly.push({ kind: 'gone' }));
  c.subscribe('items', 'public', pub.handlers());
  fc.ack(await fc.expect('subscribe', key('secret')));
  fc.ack(await fc.expect('subscribe', key('public')));
  fc.send({ type: 'revoked', key: key('secret'), reason: 'access withdrawn' });
  fc.rows(key('secret'), 9, 'must not arrive');
  fc.rows(key('public'), 1, 'public');
  const e = await full.next('revoked');
  assert.deepEqual(e, { kind: 'revoked', reason: 'access withdrawn' });
  assert.equal((await goneOnly.next('gone')).kind, 'gone');
  await expectRows(pub, 'public');

  fc.ws.terminate();
  await states.until((e) => e.kind === State.DISCONNECTED, 'disconnected');
  fc = await f.accept();
  await fc.expect('subscribe', key('public'));
  c.subscribe('items', 'fence', () => {});
  await fc.expect('subscribe', key('fence')); // and not the revoked key
  assert.deepEqual(full.drain(), []);
});

test('refusals: forbidden ends the subscription, rate_limited is retried, ref-less errors go to the client', async (t) => {
  const f = await fakeServer(t);
  const errors = new Recorder();
  const { c, states } = client(t, f.url, { onError: (err) => errors.push({ kind: 'error', err }) });
  let fc = await f.accept();

  const forbidden = new Recorder();
  c.subscribe('items', 'forbidden', forbidden.handlers());
  let r = await fc.expect('subscribe', key('forbidden'));
  fc.send({ type: 'error', ref: r.ref, code: 'forbidden', message: 'no' });
  const e = await forbidden.next('error');
  assert.equal(e.err.code, 'forbidden');
  assert.equal(e.err.message, 'no');
  assert.deepEqual(e.err.key, key('forbidden'));

  const limited = new Recorder();
  c.subscribe('items', 'limited', limited.handlers());
  r = await fc.expect('subscribe', key('limited'));
  fc.send({ type: 'error', ref: r.ref, code: 'rate_limited', message: 'slow down' });
  assert.equal((await errors.next('rate_limited')).err.code, 'rate_limited');
  fc.ack(await fc.expect('subscribe', key('limited'))); // retried
  fc.rows(key('limited'), 1, 'ok');
  await expectRows(limited, 'ok');

  fc.send({ type: 'error', code: 'bad_request', message: 'what' });
  const e2 = await errors.next('bad_request');
  assert.equal(e2.err.code, 'bad_request');
  assert.equal(e2.err.action, undefined);

  fc.ws.terminate();
  await states.until((e) => e.kind === State.DISCONNECTED, 'disconnected');
  fc = await f.accept();
  await fc.expect('subscribe', key('limited'));
  c.subscribe('items', 'fence', () => {});
  await fc.expect('subscribe', key('fence')); // and not the forbidden key
});

test('the secret is sent first, now and after every reconnect', async (t) => {
  const f = await fakeServer(t);
  const { c, states } = client(t, f.url, { secret: 'first' });
  c.subscribe('items', '1', () => {});
  let fc = await f.accept();
  assert.equal((await fc.expect('secret')).body, 'first');
  await fc.expect('subscribe', key('1'));
  c.setSecret('second');
  assert.equal((await fc.expect('secret')).body, 'second');

  fc.ws.close(1001, 'going away');
  const lost = await states.until((e) => e.kind === State.DISCONNECTED, 'disconnected');
  assert.equal(lost.info.code, 1001);
  fc = await f.accept();
  assert.equal((await fc.expect('secret')).body, 'second');
  await fc.expect('subscribe', key('1'));
});

test('backoff doubles per failed attempt up to the cap', async (t) => {
  const f = await fakeServer(t, { subprotocol: false }); // every attempt fails
  // Draw every delay at the top of its range, so the gaps show the ceilings.
  const random = Math.random;
  Math.random = () => 0.999;
  t.after(() => (Math.random = random));
  const { c, states } = client(t, f.url, { minBackoff: 20, maxBackoff: 80 });
  const failures = [];
  for (let i = 0; i < 7; i++) {
    const e = await states.until((e) => e.kind === State.DISCONNECTED, 'a failed attempt');
    failures.push(e.at); // not performance.now(): this await may resume late
  }
  c.close();
  Math.random = random;
  const gaps = failures.slice(1).map((x, i) => x - failures[i]);
  const ceilings = [20, 40, 80, 80, 80, 80]; // 20 * 2^n, capped at 80
  ceilings.forEach((ceil, i) => {
    assert.ok(gaps[i] >= ceil * 0.999 - 2, `gap ${i} is ${gaps[i]} ms, below its ceiling ${ceil}`);
  });
  // Uncapped, the last gaps would be 320 ms and more.
  for (const g of gaps.slice(3)) assert.ok(g < 300, `gap ${g} ms: the cap did not hold`);
});

test('disconnected carries retryIn, the delay until the next attempt', async (t) => {
  const f = await fakeServer(t, { subprotocol: false }); // every attempt fails
  const random = Math.random;
  Math.random = () => 0.999;
  t.after(() => (Math.random = random));
  const { c, states } = client(t, f.url, { minBackoff: 20, maxBackoff: 80 });
  const retries = [];
  for (let i = 0; i < 4; i++) {
    const e = await states.until((e) => e.kind === State.DISCONNECTED, 'a failed attempt');
    const next = await states.until((e) => e.kind === State.CONNECTING, 'the next attempt');
    retries.push(e.info.retryIn);
    assert.ok(next.at - e.at >= e.info.retryIn - 2, `the next attempt came ${next.at - e.at} ms later, retryIn said ${e.info.retryIn}`);
    assert.ok(e.info.error || e.info.code, `the reason is kept beside retryIn: ${JSON.stringify(e.info)}`);
  }
  c.close();
  Math.random = random;
  assert.deepEqual(retries, [20, 40, 80, 80]); // 0.999 of each ceiling, rounded
});

test('reconnect() retries at once instead of waiting out the backoff', async (t) => {
  const f = await fakeServer(t);
  const random = Math.random;
  Math.random = () => 0.999;
  t.after(() => (Math.random = random));
  const { c, states } = client(t, f.url, { minBackoff: 60000, maxBackoff: 60000 });
  const first = await f.accept();
  await states.until((e) => e.kind === State.CONNECTED, 'connected');
  c.reconnect(); // connected: nothing to do
  assert.equal(c.state, State.CONNECTED);

  first.ws.close(1001, 'going away');
  const e = await states.until((e) => e.kind === State.DISCONNECTED, 'disconnected');
  assert.equal(e.info.code, 1001);
  assert.ok(e.info.retryIn > 50000, `retryIn ${e.info.retryIn}`);
  const asked = performance.now();
  c.reconnect();
  assert.equal(c.state, State.CONNECTING, 'reconnect() opens a connection at once');
  const second = await f.accept(); // a minute early
  await states.until((e) => e.kind === State.CONNECTED, 'connected again');
  assert.ok(second.at - asked < 5000, `the new connection came ${second.at - asked} ms after reconnect()`);

  // A listener may call it from the disconnected event itself.
  const off = c.on('state', (state) => state === State.DISCONNECTED && c.reconnect());
  second.ws.close(1001, 'going away');
  await f.accept();
  await states.until((e) => e.kind === State.CONNECTED, 'connected a third time');
  off();
  c.close();
  c.reconnect(); // closed: nothing to do
  assert.equal(c.state, State.CLOSED);
});

test('a server that refuses the subprotocol is reported', async (t) => {
  const f = await fakeServer(t, { subprotocol: false });
  const { c, states } = client(t, f.url);
  const e = await states.until((e) => e.kind === State.DISCONNECTED, 'disconnected');
  assert.ok(e.info, 'disconnect info');
  c.close();
});

test('connect needs a WebSocket constructor and a ws/http URL', () => {
  const had = globalThis.WebSocket;
  try {
    globalThis.WebSocket = undefined;
    assert.throws(() => connect('ws://127.0.0.1:1/'), /WebSocket/);
  } finally {
    globalThis.WebSocket = had;
  }
  assert.throws(() => connect('ftp://x/', { WebSocket }), TypeError);
});

test('a connection silent for 2 x heartbeatMs (+1 s) is given up and replaced', async (t) => {
  const f = await fakeServer(t, { welcome: { ...DEFAULT_WELCOME, heartbeatMs: 100 } });
  const { c, states } = client(t, f.url);
  const rec = new Recorder();
  c.subscribe('items', '1', rec.handlers());
  let fc = await f.accept();
  fc.ack(await fc.expect('subscribe', key('1')));
  fc.rows(key('1'), 1, 'v1');
  await expectRows(rec, 'v1');
  const lastFrame = performance.now(); // the client read the rows no earlier

  // The server goes silent without closing anything: a half-open socket.
  const lost = await states.until((e) => e.kind === State.DISCONNECTED, 'disconnected');
  const silent = performance.now() - lastFrame;
  assert.ok(silent >= 200, `gave up after ${silent} ms, before twice the heartbeat interval`);
  assert.equal(lost.info?.error?.code, 'timeout', `disconnect info ${JSON.stringify(lost.info)}`);
  assert.match(lost.info.error.message, /heartbeat/);

  fc = await f.accept(); // reconnected, and subscribed again
  fc.ack(await fc.expect('subscribe', key('1')));
  fc.rows(key('1'), 1, 'v1 again');
  await expectRows(rec, 'v1 again');
});

test('heartbeat frames keep a connection alive and reach no callback', async (t) => {
  const f = await fakeServer(t, { welcome: { ...DEFAULT_WELCOME, heartbeatMs: 100 } });
  const errors = new Recorder();
  const { c, states } = client(t, f.url, { onError: (err) => errors.push({ kind: 'error', err }) });
  const fc = await f.accept();
  await states.until((e) => e.kind === State.CONNECTED, 'connected');
  // The limit is 2 x 100 ms + 1 s: beat every 50 ms for twice that.
  const end = performance.now() + 2 * 1200;
  while (performance.now() < end) {
    fc.send({ type: 'heartbeat' });
    await new Promise((res) => setTimeout(res, 50)); // the server's beat, not a wait for the client
  }
  c.subscribe('items', '1', () => {});
  await fc.expect('subscribe', key('1')); // still the first connection
  assert.deepEqual(states.drain(), []);
  assert.deepEqual(errors.drain(), []);
  assert.equal(c.state, State.CONNECTED);
});

/**
 * Fails unless the requests' arrival times fit the server's token bucket: by
 * time t after the first, at most burst + rate*t of them. 5 ms of leeway: the
 * scripted server shares the client's event loop, so an arrival may be
 * noted late (the first one, late, shrinks every gap). Unpaced requests
 * arrive within a millisecond, far below the gaps checked (20 ms and more).
 */
function checkBucket(reqs, rate, burst) {
  for (let i = burst; i < reqs.length; i++) {
    const minGap = ((i + 1 - burst) / rate) * 1000;
    const gap = reqs[i].at - reqs[0].at;
    assert.ok(gap >= minGap - 5, `request ${i + 1} arrived ${gap.toFixed(1)} ms after the first; a bucket of ${burst} at ${rate}/s allows it after ${minGap} ms`);
  }
}

test('requests are paced within the announced rate limit, also when resubscribing', async (t) => {
  const rate = 40;
  const burst = 5;
  const f = await fakeServer(t, { welcome: { ...DEFAULT_WELCOME, limits: { maxSubscriptions: 100, messagesPerSecond: rate, messageBurst: burst } } });
  const { c, states } = client(t, f.url);
  let fc = await f.accept();
  await states.until((e) => e.kind === State.CONNECTED, 'connected');
  const ids = Array.from({ length: 16 }, (_, i) => String(i));
  for (const id of ids) c.subscribe('items', id, () => {});
  const reqs = [];
  for (const id of ids) {
    const r = await fc.expect('subscribe', key(id));
    fc.ack(r);
    reqs.push(r);
  }
  checkBucket(reqs, rate, burst);

  fc.ws.terminate();
  await states.until((e) => e.kind === State.DISCONNECTED, 'disconnected');
  fc = await f.accept();
  const again = [];
  for (const id of ids) again.push(await fc.expect('subscribe', key(id))); // oldest first
  checkBucket(again, rate, burst);
});

test('no more keys than maxSubscriptions are sent; the excess is reported as too_many_subscriptions', async (t) => {
  const f = await fakeServer(t, { welcome: { ...DEFAULT_WELCOME, limits: { maxSubscriptions: 3 } } });
  const { c, states } = client(t, f.url);
  let fc = await f.accept();
  await states.until((e) => e.kind === State.CONNECTED, 'connected');
  const recs = [];
  const unsubs = [];
  for (let i = 0; i < 5; i++) {
    recs.push(new Recorder());
    unsubs.push(c.subscribe('items', String(i), recs[i].handlers()));
  }
  for (let i = 0; i < 3; i++) fc.ack(await fc.expect('subscribe', key(String(i))));
  for (let i = 3; i < 5; i++) {
    const e = await recs[i].next(`error for key ${i}`);
    assert.equal(e.kind, 'error');
    assert.equal(e.err.code, 'too_many_subscriptions');
    assert.deepEqual(e.err.key, key(String(i)));
    assert.equal(e.err.action, 'subscribe');
  }
  // Room again after an unsubscribe; the refused keys were never sent.
  unsubs[0]();
  fc.ack(await fc.expect('unsubscribe', key('0')));
  const fence = new Recorder();
  c.subscribe('items', 'fence', fence.handlers());
  fc.ack(await fc.expect('subscribe', key('fence')));

  // Holding 1, 2 and the fence, the client meets a server that allows 2.
  f.setWelcome({ ...DEFAULT_WELCOME, limits: { maxSubscriptions: 2 } });
  fc.ws.terminate();
  await states.until((e) => e.kind === State.DISCONNECTED, 'disconnected');
  fc = await f.accept();
  fc.ack(await fc.expect('subscribe', key('1')));
  fc.ack(await fc.expect('subscribe', key('2')));
  const e = await fence.next('error for the fence');
  assert.equal(e.err.code, 'too_many_subscriptions');
  unsubs[1]();
  await fc.expect('unsubscribe', key('1')); // and no subscribe of the fence before it
  for (const r of [...recs, fence]) assert.deepEqual(r.drain(), []);
});

test('a server that drops every connection right after welcome or ack makes the client back off; only a connection that stayed open healthyAfter resets it', async (t) => {
  const f = await fakeServer(t);
  // Draw every delay at the top of its range, so the gaps show the ceilings.
  const random = Math.random;
  Math.random = () => 0.999;
  t.after(() => (Math.random = random));
  const healthyAfter = 300;
  const { c } = client(t, f.url, { minBackoff: 20, maxBackoff: 640, healthyAfter });
  const rec = new Recorder();
  c.subscribe('items', '1', rec.handlers());
  let fc = await f.accept();
  let req = await fc.expect('subscribe', key('1'));
  let n = 0;
  for (const ceil of [20, 40, 80, 160, 320, 640, 640]) {
    const prev = fc;
    if (++n % 2 === 0) {
      // Answered: the subscription is acked and its rows delivered, as by
      // a server whose next frame the client cannot read. Still no reason
      // to come back at the first delay.
      prev.ack(req);
      prev.rows(key('1'), 1, `v${n}`);
      await expectRows(rec, `v${n}`);
    }
    prev.ws.terminate(); // dropped right after welcome (or the ack)
    fc = await f.accept();
    const gap = fc.at - prev.at;
    assert.ok(gap >= ceil * 0.999 - 2, `reconnected ${gap.toFixed(1)} ms after a connection dropped right after welcome; the backoff ceiling should have grown to ${ceil} ms`);
    req = await fc.expect('subscribe', key('1'));
  }
  // This connection stays open healthyAfter, so it proved healthy: the next
  // reconnect waits the first ceiling (20 ms) again, not 640 ms.
  fc.ack(req);
  fc.rows(key('1'), 1, 'healthy');
  await expectRows(rec, 'healthy');
  // Waiting out healthyAfter is what is tested here, so it is a timer, not
  // an event. The client took its welcome before it sent req.
  await new Promise((res) => setTimeout(res, healthyAfter + 5 - (performance.now() - req.at)));
  const cut = performance.now();
  fc.ws.terminate();
  fc = await f.accept();
  const gap = fc.at - cut;
  assert.ok(gap < 320, `reconnected ${gap.toFixed(1)} ms after a connection that stayed open ${healthyAfter} ms ended: the backoff was not reset`);
  Math.random = random;
});

test('at most 32 requests await an answer at a time', async (t) => {
  const f = await fakeServer(t); // no rate limit: only the window holds requests back
  const { c, states } = client(t, f.url);
  const fc = await f.accept();
  await states.until((e) => e.kind === State.CONNECTED, 'connected');
  const ids = Array.from({ length: 40 }, (_, i) => String(i));
  for (const id of ids) c.subscribe('items', id, () => {});
  const reqs = [];
  for (const id of ids.slice(0, 32)) reqs.push(await fc.expect('subscribe', key(id)));
  // Each further request is sent only once an earlier one was answered.
  for (let i = 32; i < ids.length; i++) {
    const answered = performance.now();
    fc.ack(reqs[i - 32]);
    const r = await fc.expect('subscribe', key(ids[i]));
    assert.ok(r.at >= answered, `request ${i + 1} arrived before an answer freed a place for it`);
  }
});

test('a rate announced without a burst paces requests one at a time', async (t) => {
  const rate = 50;
  const f = await fakeServer(t, { welcome: { ...DEFAULT_WELCOME, limits: { messagesPerSecond: rate } } });
  const { c, states } = client(t, f.url);
  const fc = await f.accept();
  await states.until((e) => e.kind === State.CONNECTED, 'connected');
  const ids = ['0', '1', '2', '3', '4', '5'];
  for (const id of ids) c.subscribe('items', id, () => {});
  const reqs = [];
  for (const id of ids) {
    const r = await fc.expect('subscribe', key(id));
    fc.ack(r);
    reqs.push(r);
  }
  checkBucket(reqs, rate, 1);
});

// --- collections, diffs and resume ---

const list = (id) => ({ entity: 'lists', id });
const itemRow = (id, text) => ({ id, text });

/** Records onRows(rows, changes) and onGone(changes). */
function collectionHandlers(rec) {
  return {
    onRows: (rows, changes) => rec.push({ kind: 'rows', rows, changes }),
    onGone: (changes) => rec.push({ kind: 'gone', changes }),
    onRevoked: (reason) => rec.push({ kind: 'revoked', reason }),
    onError: (err) => rec.push({ kind: 'error', err }),
  };
}

test('a collection: rows and diffs reach onRows with their changes; a late subscription gets every row as added', async (t) => {
  const f = await fakeServer(t);
  const { c } = client(t, f.url);
  const fc = await f.accept();
  const rec = new Recorder();
  c.subscribe('lists', '1', collectionHandlers(rec));
  fc.ack(await fc.expect('subscribe', list('1')));
  const [a, b, c1] = [itemRow('a', 'A'), itemRow('b', 'B'), itemRow('c', 'C')];
  fc.send({ type: 'rows', key: list('1'), seq: 1, version: 'v1', ids: ['a', 'b'], rows: [a, b] });
  let e = await rec.next('first rows');
  assert.deepEqual(e.rows, [a, b]);
  assert.deepEqual(e.changes, [
    { type: 'added', id: 'a', row: a },
    { type: 'added', id: 'b', row: b },
  ]);

  const b2 = itemRow('b', 'B2');
  fc.send({ type: 'diff', key: list('1'), seq: 2, base: 'v1', version: 'v2', upsert: [{ id: 'c', row: c1 }, { id: 'b', row: b2 }], remove: ['a'] });
  e = await rec.next('the diff');
  assert.deepEqual(e.rows, [b2, c1]);
  assert.deepEqual(e.changes, [
    { type: 'removed', id: 'a', row: a },
    { type: 'modified', id: 'b', row: b2 },
    { type: 'added', id: 'c', row: c1 },
  ]);
  fc.send({ type: 'diff', key: list('1'), seq: 3, base: 'v2', version: 'v3', order: ['c', 'b'] });
  e = await rec.next('a reorder');
  assert.deepEqual(e.rows, [c1, b2]);
  assert.deepEqual(e.changes, []);

  const late = new Recorder();
  c.subscribe('lists', '1', collectionHandlers(late)); // shares the key: no request
  e = await late.next('the late subscription');
  assert.deepEqual(e.rows, [c1, b2]);
  assert.deepEqual(e.changes, [
    { type: 'added', id: 'c', row: c1 },
    { type: 'added', id: 'b', row: b2 },
  ]);

  fc.send({ type: 'gone', key: list('1'), seq: 4, version: 'e0' });
  for (const r of [rec, late]) {
    e = await r.next('gone');
    assert.equal(e.kind, 'gone');
    assert.deepEqual(e.changes, [
      { type: 'removed', id: 'c', row: c1 },
      { type: 'removed', id: 'b', row: b2 },
    ]);
  }
});

test('a reconnect resubscribes with the version held; unchanged runs no callback, and diffs apply after it', async (t) => {
  const f = await fakeServer(t);
  const { c, states } = client(t, f.url);
  const rec = new Recorder();
  const plain = new Recorder();
  c.subscribe('lists', '1', collectionHandlers(rec));
  c.subscribe('items', 'p', plain.handlers());
  let fc = await f.accept();
  fc.ack(await fc.expect('subscribe', list('1')));
  fc.ack(await fc.expect('subscribe', key('p')));
  const a = itemRow('a', 'A');
  fc.send({ type: 'rows', key: list('1'), seq: 1, version: 'v1', ids: ['a'], rows: [a] });
  fc.send({ type: 'rows', key: key('p'), seq: 2, version: 'p1', rows: ['plain'] });
  await rec.next('rows');
  await expectRows(plain, 'plain');

  fc.ws.terminate();
  await states.until((e) => e.kind === State.DISCONNECTED, 'disconnected');
  fc = await f.accept();
  // Every key, a plain one too, carries the version of the state held.
  fc.ack(await fc.expect('subscribe', { ...list('1'), version: 'v1' }));
  fc.ack(await fc.expect('subscribe', { ...key('p'), version: 'p1' }));
  fc.send({ type: 'unchanged', key: list('1'), seq: 1, version: 'v1' });
  fc.send({ type: 'unchanged', key: key('p'), seq: 2, version: 'p1' });
  // A diff from the state held still applies, numbered after the unchanged.
  fc.send({ type: 'diff', key: list('1'), seq: 1, base: 'v1', version: 'v2', upsert: [{ id: 'b', row: 'B' }] }); // stale seq: dropped
  fc.send({ type: 'diff', key: list('1'), seq: 3, base: 'v1', version: 'v2', upsert: [{ id: 'b', row: 'B' }] });
  const e = await rec.next('the diff after unchanged');
  assert.deepEqual(e.rows, [a, 'B']);
  assert.deepEqual(e.changes, [{ type: 'added', id: 'b', row: 'B' }]);
  assert.deepEqual(rec.drain(), []); // nothing for the unchanged frames
  assert.deepEqual(plain.drain(), []);

  // A full state after a reconnect to a server without the version: the
  // changes are computed against the rows held.
  fc.ws.terminate();
  await states.until((e) => e.kind === State.DISCONNECTED, 'disconnected');
  fc = await f.accept();
  fc.ack(await fc.expect('subscribe', { ...list('1'), version: 'v2' }));
  fc.send({ type: 'rows', key: list('1'), seq: 1, version: 'v5', ids: ['b', 'c'], rows: ['B', 'C'] });
  const full = await rec.next('full rows');
  assert.deepEqual(full.rows, ['B', 'C']);
  assert.deepEqual(full.changes, [
    { type: 'removed', id: 'a', row: a },
    { type: 'added', id: 'c', row: 'C' },
  ]);
});

test('a diff from another base is never applied: one subscribe with the version held, then its answer', async (t) => {
  const f = await fakeServer(t);
  const { c } = client(t, f.url);
  const fc = await f.accept();
  const rec = new Recorder();
  c.subscribe('lists', '1', collectionHandlers(rec));
  fc.ack(await fc.expect('subscribe', list('1')));
  fc.send({ type: 'rows', key: list('1'), seq: 1, version: 'v1', ids: ['a', 'b'], rows: ['A', 'B'] });
  await rec.next('rows');

  fc.send({ type: 'diff', key: list('1'), seq: 2, base: 'v0', version: 'v2', remove: ['a'] });
  const again = await fc.expect('subscribe', { ...list('1'), version: 'v1' });
  // More diffs from the wrong base while that subscribe awaits its answer:
  // no second subscribe, nothing applied.
  fc.send({ type: 'diff', key: list('1'), seq: 3, base: 'v2', version: 'v3', remove: ['b'] });
  fc.send({ type: 'unchanged', key: list('1'), seq: 4, version: 'v3' });
  c.subscribe('items', 'fence', () => {});
  fc.ack(await fc.expect('subscribe', key('fence')));
  fc.ack(again);
  fc.send({ type: 'diff', key: list('1'), seq: 5, base: 'v1', version: 'v4', remove: ['a'], upsert: [{ id: 'c', row: 'C' }] });
  const e = await rec.next('the answer');
  assert.deepEqual(e.rows, ['B', 'C']);
  assert.deepEqual(e.changes, [
    { type: 'removed', id: 'a', row: 'A' },
    { type: 'added', id: 'c', row: 'C' },
  ]);

  // An unchanged naming another version than the one held: subscribe again.
  fc.send({ type: 'unchanged', key: list('1'), seq: 6, version: 'v9' });
  fc.ack(await fc.expect('subscribe', { ...list('1'), version: 'v4' }));
  assert.deepEqual(rec.drain(), []);
});

test('an invalid diff is reported and the full state asked for; an invalid rows frame is dropped', async (t) => {
  const f = await fakeServer(t);
  const errors = new Recorder();
  const { c } = client(t, f.url, { onError: (err) => errors.push({ kind: 'error', err }) });
  const fc = await f.accept();
  const rec = new Recorder();
  c.subscribe('lists', '1', collectionHandlers(rec));
  fc.ack(await fc.expect('subscribe', list('1')));
  fc.send({ type: 'rows', key: list('1'), seq: 1, version: 'v1', ids: ['a'], rows: ['A'] });
  await rec.next('rows');

  fc.send({ type: 'diff', key: list('1'), seq: 2, base: 'v1', version: 'v2', order: ['a', 'zz'] });
  let e = await errors.next('bad_frame');
  assert.equal(e.err.code, 'bad_frame');
  assert.deepEqual(e.err.key, list('1'));
  assert.match(e.err.message, /order/);
  fc.ack(await fc.expect('subscribe', list('1'))); // no version: the full state

  fc.send({ type: 'rows', key: list('1'), seq: 3, version: 'v3', ids: ['a', 'a'], rows: ['A', 'A2'] });
  e = await errors.next('bad_frame');
  assert.match(e.err.message, /twice/);
  fc.send({ type: 'rows', key: list('1'), seq: 4, version: 'v4', ids: ['b'], rows: ['B'] });
  const r = await rec.next('rows');
  assert.deepEqual(r.changes, [
    { type: 'removed', id: 'a', row: 'A' },
    { type: 'added', id: 'b', row: 'B' },
  ]);
});

test('revoked without onRevoked: onGone with every row removed', async (t) => {
  const f = await fakeServer(t);
  const { c } = client(t, f.url);
  const fc = await f.accept();
  const rec = new Recorder();
  c.subscribe('lists', '1', { onRows: (rows, changes) => rec.push({ kind: 'rows', rows, changes }), onGone: (changes) => rec.push({ kind: 'gone', changes }) });
  fc.ack(await fc.expect('subscribe', list('1')));
  fc.send({ type: 'rows', key: list('1'), seq: 1, version: 'v1', ids: ['a'], rows: ['A'] });
  await rec.next('rows');
  fc.send({ type: 'revoked', key: list('1'), reason: 'no' });
  const e = await rec.next('gone');
  assert.deepEqual(e, { kind: 'gone', changes: [{ type: 'removed', id: 'a', row: 'A' }] });
});
