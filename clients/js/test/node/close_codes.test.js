// How connections end, seen from the ws package talking straight to a real
// Go server (testserver's direct address: a proxy in between would change
// how a connection ends): every close the server initiates or answers
// reaches the client with its code before the socket closes; and how the
// server reads what a client sends: fragmented messages (the read limit
// counted over all fragments), pings, a close without a code, a malformed
// frame.

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

/** Opens a connection (the seed's dialect) straight to server 0; resolves once open. */
async function open() {
  const ws = new WebSocket(srv.servers[0].direct.ws);
  ws.errors = [];
  ws.closed = withTimeout(
    new Promise((res) => ws.once('close', (code, reason) => res({ code, reason: reason.toString() }))),
    WAIT,
    'the connection to close',
  );
  ws.on('error', (err) => ws.errors.push(err.message));
  await withTimeout(new Promise((res) => ws.once('open', res)), WAIT, 'the connection to open');
  return ws;
}

test('a client that closes while a large frame is on its way gets its own code back', async () => {
  const ws = await open();
  // Two 8 MiB rows: when the first has arrived, the server is writing the
  // second, far larger than the sockets' buffers, and the close arrives in
  // the middle of it.
  let messages = 0;
  ws.on('message', () => {
    if (++messages === 1) ws.close(4001, 'leaving');
  });
  for (const id of ['8192', '8191']) {
    ws.send(JSON.stringify({ action: 'subscribe', body: { entity: 'big', id } }));
  }
  const { code } = await ws.closed;
  assert.equal(code, 4001, `closed with ${code} (errors: ${ws.errors.join('; ') || 'none'}), want the client's own 4001 echoed by the server`);
  assert.deepEqual(ws.errors, []);
});

test('a frame that breaks the protocol (unmasked) closes the connection with 1002', async () => {
  const ws = await open();
  // ws never sends a malformed frame: this one goes on its socket as raw
  // bytes, a text frame "{}" without the mask every client frame must have.
  ws._socket.write(Buffer.from([0x81, 0x02, 0x7b, 0x7d]));
  const { code, reason } = await ws.closed;
  assert.equal(code, 1002, `closed with ${code} (errors: ${ws.errors.join('; ') || 'none'}), want 1002`);
  assert.match(reason, /mask/, 'the close reason names what was wrong');
});

for (const size of [40 << 10, 4 << 20]) {
  test(`a ${size >> 10} KiB frame, over the server's read limit, closes the connection with 1009`, async () => {
    const ws = await open();
    // The limit is 32 KiB: 40 KiB, as a page might send, and 4 MiB, which
    // the client is still sending when the server answers.
    ws.send('x'.repeat(size));
    const { code } = await ws.closed;
    assert.equal(code, 1009, `closed with ${code} (errors: ${ws.errors.join('; ') || 'none'}), want 1009`);
    assert.deepEqual(ws.errors, []);
  });
}

test('a message sent in fragments is read whole: a subscribe split in three gets its rows', async () => {
  const ws = await open();
  const first = withTimeout(new Promise((res) => ws.once('message', (data) => res(data.toString()))), WAIT, 'a row');
  const req = JSON.stringify({ action: 'subscribe', body: { entity: 'big', id: '1' } });
  const third = Math.ceil(req.length / 3);
  ws.send(req.slice(0, third), { fin: false });
  ws.send(req.slice(third, 2 * third), { fin: false });
  ws.send(req.slice(2 * third), { fin: true });
  assert.match(await first, /^\{"id":"1","pad":"x+"\}$/);
  ws.close(1000);
  assert.equal((await ws.closed).code, 1000);
  assert.deepEqual(ws.errors, []);
});

test('fragments adding up to more than the read limit close the connection with 1009', async () => {
  const ws = await open();
  // 20 KiB twice: each fragment is under the 32 KiB limit, the message is not.
  ws.send('x'.repeat(20 << 10), { fin: false });
  ws.send('x'.repeat(20 << 10), { fin: true });
  const { code } = await ws.closed;
  assert.equal(code, 1009, `closed with ${code} (errors: ${ws.errors.join('; ') || 'none'}), want 1009`);
  assert.deepEqual(ws.errors, []);
});

test('a ping is answered with a pong carrying its payload', async () => {
  const ws = await open();
  const pong = withTimeout(new Promise((res) => ws.once('pong', (data) => res(data.toString()))), WAIT, 'the pong');
  ws.ping('are you there');
  assert.equal(await pong, 'are you there');
  ws.close(1000);
  await ws.closed;
});

test('a close without a code is answered with a close without a code (1005)', async () => {
  const ws = await open();
  ws.close();
  const { code } = await ws.closed;
  assert.equal(code, 1005, `closed with ${code}, want 1005: the server's answer carries no code either`);
  assert.deepEqual(ws.errors, []);
});

// Last: the restart moves server 0's direct address.
test('a server shutting down closes with 1001', async () => {
  const ws = await open();
  await srv.control('/restart?server=0');
  const { code } = await ws.closed;
  assert.equal(code, 1001);
  assert.deepEqual(ws.errors, []);
});
