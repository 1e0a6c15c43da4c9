// The client in real headless Chromium (Debian's, driven by playwright-core)
// against the real Go servers: the page is served by server 0 and
// subscribes there; changes are notified on server 1 and cross nsqd.
//
// With ES_SCREENSHOT=/some/path.png set, the first test saves a screenshot
// of its page there and the list test one beside it (path-list.png).

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

const listOp = (...args) => srv.list(...args);

/**
 * Waits until the page's list shows exactly rows (ids and texts, in order);
 * returns each element's {id, born}: born is the serial number the page gave
 * the element when it made it.
 */
async function showsRows(page, rows) {
  const want = JSON.stringify(rows.map((r) => [r.id, r.text]));
  await page.waitForFunction(
    (want) => JSON.stringify([...document.querySelectorAll('#list li')].map((li) => [li.dataset.id, li.firstChild.textContent])) === want,
    want,
    { timeout: WAIT },
  );
  return page.$$eval('#list li', (lis) => lis.map((li) => ({ id: li.dataset.id, born: li.dataset.born })));
}

test('a page shows a list; items added, changed, moved and removed on the other server appear in place', async () => {
  const page = await context.newPage();
  const pageErrors = [];
  page.on('pageerror', (err) => pageErrors.push(err));
  const list = 'browser-list';
  let rows = await listOp(1, list, 'fill', { n: 4, text: 'Item' });
  await page.goto(`${srv.servers[0].http}/test/browser/list.html?list=${list}&minBackoff=50&maxBackoff=500`);
  let shown = await showsRows(page, rows);
  const connected = () => page.evaluate(() => window.es.states.filter((s) => s === 'connected').length);

  /**
   * Waits until the page shows rows, and checks that it got exactly the
   * changes expected (['added milk', ...]) and kept the element of every
   * item that stayed.
   */
  async function showsInPlace(what, changes) {
    const before = new Map(shown.map((e) => [e.id, e.born]));
    shown = await showsRows(page, rows);
    for (const { id, born } of shown) {
      if (before.has(id)) assert.equal(born, before.get(id), `${what}: the element of ${id} was made again`);
    }
    const got = await page.evaluate(() => window.es.changes.at(-1).map((c) => `${c.type} ${c.id}`));
    assert.deepEqual(got, changes, what);
  }

  rows = await listOp(1, list, 'add', { item: 'milk', text: 'Buy milk', at: 1 });
  await showsInPlace('add', ['added milk']);
  rows = await listOp(1, list, 'set', { item: 'i2', text: 'Item 2, changed' });
  await showsInPlace('set', ['modified i2']);
  rows = await listOp(1, list, 'remove', { item: 'i0' });
  await showsInPlace('remove', ['removed i0']);
  rows = await listOp(1, list, 'move', { item: 'i3', at: 0 });
  await showsInPlace('move', []);

  // Changed while the page's connection is cut: after the reconnect the
  // page gets just those changes, and keeps the other elements.
  const n = await connected();
  await srv.control('/cut?server=0&down=1');
  await page.waitForFunction(() => window.es.states.at(-1) === 'disconnected', null, { timeout: WAIT });
  await listOp(1, list, 'add', { item: 'bread', text: 'Buy bread' });
  rows = await listOp(1, list, 'set', { item: 'milk', text: 'Buy oat milk' });
  await srv.control('/up?server=0');
  await page.waitForFunction((n) => window.es.states.filter((s) => s === 'connected').length > n, n, { timeout: WAIT });
  await showsInPlace('changed while cut', ['modified milk', 'added bread']);

  const { errors, gone } = await page.evaluate(() => ({ errors: window.es.errors, gone: window.es.gone }));
  assert.deepEqual(errors, []);
  assert.equal(gone, 0);
  assert.deepEqual(pageErrors, []);
  if (process.env.ES_SCREENSHOT) await page.screenshot({ path: process.env.ES_SCREENSHOT.replace(/(\.png)?$/, '-list.png') });
  await page.close();
});
