// The client in real headless Chromium (Debian's, driven by playwright-core)
// against the real Go servers: the page is served by server 0 and
// subscribes there; changes are notified on server 1 and cross nsqd.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';

import { startTestServer, launchChromium, WAIT } from '../helpers.js';

let srv;
let context;

before(async () => {
  srv = await startTestServer();
  context = await launchChromium();
});

after(async () => {
  await context?.close();
  await srv?.stop();
});

const bump = (server, id) => srv.control(`/bump?server=${server}&id=${id}`).then((r) => r.v);

/** Waits until the page shows version >= v. */
async function showsVersion(page, v) {
  await page.waitForFunction((v) => window.es && window.es.versions.at(-1) >= v, v, { timeout: WAIT });
  assert.equal(await page.textContent('#version'), `v${await page.evaluate(() => window.es.versions.at(-1))}`);
}

/** Waits until the page's client is in state. */
async function inState(page, state) {
  const t0 = Date.now();
  await page.waitForFunction((s) => window.es && window.es.states.at(-1) === s, state, { timeout: WAIT });
  console.log("state", state, Date.now() - t0);
}

test('a page follows changes made on the other server, across a cut and a restart', async () => {
  const page = await context.newPage();
  const pageErrors = [];
  page.on('pageerror', (err) => pageErrors.push(err));
  const id = 'browser-1';
  await page.goto(`${srv.servers[0].http}/test/browser/page.html?id=${id}&minBackoff=50&maxBackoff=500`);

  await inState(page, 'connected');
  await showsVersion(page, 0);

  // A change notified on server 1 reaches the page through nsqd and server 0.
  await showsVersion(page, await bump(1, id));

  // Cut the page's connection (no close frame) and keep server 0
  // unreachable while the item changes twice.
  await srv.control('/cut?server=0&down=1');
  await inState(page, 'disconnected');
  await bump(1, id);
  const whileCut = await bump(1, id);
  const shown = await page.evaluate(() => window.es.versions.at(-1));
  assert.ok(shown < whileCut, 'the page cannot have seen the change while cut');
  await srv.control('/up?server=0');
  await inState(page, 'connected');
  await showsVersion(page, whileCut); // delivered by the resubscription

  await showsVersion(page, await bump(1, id)); // and changes keep coming

  // Server 0 restarts (close code 1001); the page reconnects to the new one.
  await srv.control('/restart?server=0');
  await page.waitForFunction(() => window.es.states.filter((s) => s === 'disconnected').length >= 2, null, { timeout: WAIT });
  await inState(page, 'connected');
  await showsVersion(page, await bump(1, id));

  const { versions, errors } = await page.evaluate(() => ({ versions: window.es.versions, errors: window.es.errors }));
  for (let i = 1; i < versions.length; i++) {
    assert.ok(versions[i] >= versions[i - 1], `versions went back: ${versions}`);
  }
  assert.deepEqual(errors, []);
  assert.deepEqual(pageErrors, []);
  if (process.env.ES_SCREENSHOT) await page.screenshot({ path: process.env.ES_SCREENSHOT });
  await page.close();
});

test('the page shows gone, then rows again', async () => {
  const page = await context.newPage();
  const id = 'browser-2';
  await page.goto(`${srv.servers[0].http}/test/browser/page.html?id=${id}`);
  await showsVersion(page, 0);
  await srv.control(`/delete?server=1&id=${id}`);
  await page.waitForFunction(() => window.es.gone === 1, null, { timeout: WAIT });
  assert.equal(await page.textContent('#version'), 'gone');
  await showsVersion(page, await bump(1, id));
  await page.close();
});
