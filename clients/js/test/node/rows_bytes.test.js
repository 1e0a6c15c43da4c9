// Rows arrive byte for byte as the fetch produced them, seen from the ws
// package talking straight to a real Go server, in both dialects: spaces
// kept, <, >, & and U+2028 not escaped (the test server's entity "spaced").

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';

import { startTestServer, withTimeout, WAIT } from '../helpers.js';

let srv;
before(async () => {
  srv = await startTestServer();
});
after(async () => {
  await srv?.stop();
});

const rowsOf = (id) => [`{"id":"${id}", "n": 2}`, `{"id":"${id}","s":"<&>\u2028"}`];

/** Opens a connection straight to server 0 and returns it with a queue of its text messages. */
async function open(protocol) {
  const ws = protocol ? new WebSocket(srv.servers[0].direct.ws, protocol) : new WebSocket(srv.servers[0].direct.ws);
  const queue = [];
  let wake = null;
  ws.on('message', (data, isBinary) => {
    assert.equal(isBinary, false);
    queue.push(data.toString('utf8'));
    wake?.();
  });
  ws.next = async (what) => {
    while (queue.length === 0) {
      await withTimeout(new Promise((res) => (wake = res)), WAIT, what);
    }
    return queue.shift();
  };
  await withTimeout(new Promise((res) => ws.once('open', res)), WAIT, 'the connection to open');
  return ws;
}

test('raw dialect: each row is a text frame holding exactly the fetched bytes', async (t) => {
  const ws = await open();
  t.after(() => ws.close());
  ws.send(JSON.stringify({ action: 'subscribe', body: { entity: 'spaced', id: 'raw' } }));
  const got = [await ws.next('the first row'), await ws.next('the second row')];
  assert.deepEqual(got, rowsOf('raw'));
});

test('envelope dialect: the rows frame embeds the fetched bytes unchanged', async (t) => {
  const ws = await open('entitysync.v1');
  t.after(() => ws.close());
  assert.equal(JSON.parse(await ws.next('welcome')).type, 'welcome');
  ws.send(JSON.stringify({ action: 'subscribe', body: { entity: 'spaced', id: 'env' }, ref: '1' }));
  let frame;
  do {
    frame = await ws.next('the rows frame');
  } while (JSON.parse(frame).type !== 'rows');
  assert.ok(frame.includes(`"rows":[${rowsOf('env').join(',')}]`), `rows not byte for byte in ${JSON.stringify(frame)}`);
});
