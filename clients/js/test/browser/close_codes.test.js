// How connections end, seen from real Chromium talking straight to a real Go
// server (testserver's direct address, with the page from the same origin:
// a proxy in between would change how a connection ends). Every close the
// server initiates or answers reaches the page's onclose with its code.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';

import { startTestServer, launchChromium, WAIT } from '../helpers.js';

let srv;
let context;
let page;

before(async () => {
  srv = await startTestServer();
  context = await launchChromium();
  page = await context.newPage();
  // Any page of the server's origin: the websocket is then same-origin.
  await page.goto(`${srv.servers[0].direct.http}/package.json`);
});

after(async () => {
  await context?.close();
  await srv?.stop();
});

/**
 * Runs in the page: opens a websocket to url, calls act(ws) once it is
 * open, and resolves with the close event's code and wasClean.
 */
function closeOf(url, act, wait) {
  return page.evaluate(
    ([url, act, wait]) =>
      new Promise((resolve, reject) => {
        const ws = new WebSocket(url);
        const timer = setTimeout(() => reject(new Error(`no close within ${wait} ms`)), wait);
        ws.onopen = () => new Function('ws', act)(ws);
        ws.onclose = (e) => {
          clearTimeout(timer);
          resolve({ code: e.code, wasClean: e.wasClean });
        };
      }),
    [url, act, wait],
  );
}

test('a page that closes while a large frame is on its way gets its own code back', async () => {
  // Two 8 MiB rows: when the first has arrived, the server is writing the
  // second, and the page's close arrives in the middle of it (as when a tab
  // closes during an update).
  const got = await closeOf(
    srv.servers[0].direct.ws,
    `let n = 0;
     ws.onmessage = () => { if (++n === 1) ws.close(4001, 'leaving'); };
     for (const id of ['8192', '8191']) ws.send(JSON.stringify({ action: 'subscribe', body: { entity: 'big', id } }));`,
    WAIT,
  );
  assert.deepEqual(got, { code: 4001, wasClean: true });
});

test('a 40 KiB frame, over the server\'s 32 KiB read limit, closes the connection with 1009', async () => {
  const got = await closeOf(srv.servers[0].direct.ws, `ws.send('x'.repeat(40 << 10));`, WAIT);
  assert.deepEqual(got, { code: 1009, wasClean: true });
});

test('a server shutting down closes with 1001', async () => {
  const closed = closeOf(srv.servers[0].direct.ws, `window.opened = true;`, WAIT);
  await page.waitForFunction(() => window.opened === true, null, { timeout: WAIT });
  await srv.control('/restart?server=0');
  assert.deepEqual(await closed, { code: 1001, wasClean: true });
});
