// The todo demo (examples/todo) in real headless Chromium, started as a user
// starts it: one command, two server processes sharing SQLite and an nsqd.
// Page A talks to server A; page B to server B through a TCP proxy this test
// can cut. A screenshot of each page is written to test-results/ (ignored by
// git).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFile } from 'node:child_process';
import { mkdtemp, mkdir, readdir, readFile, readlink, rm } from 'node:fs/promises';
import { createServer, connect as tcpConnect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { promisify } from 'node:util';

import { launchChromium, withTimeout, jsRoot, repoRoot, WAIT } from '../helpers.js';

const artefacts = join(jsRoot, 'test-results');

let todo;
let proxyB;
let context;

before(async () => {
  todo = await startTodo();
  proxyB = await startProxy(new URL(todo.urls[1]));
  context = await launchChromium();
});

after(async () => {
  await context?.close();
  proxyB?.close();
  await todo?.stop();
});

/**
 * Runs the todo command (ES_TODO, built by scripts/test.sh, or a fresh go
 * build) with two servers on free ports, and reads the URLs it prints.
 */
async function startTodo() {
  const dir = await mkdtemp(join(tmpdir(), 'es-todo-test-'));
  let bin = process.env.ES_TODO;
  if (!bin) {
    bin = join(dir, 'todo');
    await promisify(execFile)('go', ['build', '-o', bin, './examples/todo'], { cwd: repoRoot });
  }
  const child = spawn(bin, ['-listen', '127.0.0.1:0,127.0.0.1:0', '-data', join(dir, 'data')], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let log = '';
  let out = ''; // its stdout
  child.stderr.on('data', (b) => (log += b));
  const exited = new Promise((res) => child.once('exit', res));
  const urls = [];
  await withTimeout(new Promise((res, rej) => {
    createInterface({ input: child.stdout }).on('line', (line) => {
      out += `${line}\n`;
      const m = line.match(/^\s+(http:\/\/127\.0\.0\.1:\d+\/)$/);
      if (m && urls.push(m[1]) === 2) res();
    });
    exited.then((code) => rej(new Error(`todo exited with ${code} before printing two URLs:\n${log}`)));
  }), 60000, 'the todo servers to start');
  return {
    urls,
    pid: child.pid,
    log: () => log,
    output: () => out,
    async stop() {
      child.kill('SIGINT'); // Ctrl-C: stops both servers
      const timer = setTimeout(() => child.kill('SIGKILL'), 20000);
      const code = await exited;
      clearTimeout(timer);
      await rm(dir, { recursive: true, force: true });
      assert.equal(code, 0, `todo exited with ${code} after Ctrl-C:\n${log}`);
    },
  };
}

/**
 * The process id of the server listening on url's port: the child of the
 * launcher (pid) that holds the listening socket (Linux: /proc).
 */
async function serverPid(pid, url) {
  const port = Number(new URL(url).port);
  const listening = new Set(); // socket inodes
  for (const table of ['/proc/net/tcp', '/proc/net/tcp6']) {
    const text = await readFile(table, 'utf8').catch(() => '');
    for (const line of text.split('\n').slice(1)) {
      const cols = line.trim().split(/\s+/); // sl local_address rem_address st ... inode (10th)
      if (cols.length >= 10 && cols[3] === '0A' && parseInt(cols[1].split(':')[1], 16) === port) listening.add(cols[9]);
    }
  }
  for (const child of await readdir('/proc')) {
    if (!/^\d+$/.test(child)) continue;
    const stat = await readFile(`/proc/${child}/stat`, 'utf8').catch(() => '');
    if (Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]) !== pid) continue; // "pid (comm) state ppid"
    for (const fd of await readdir(`/proc/${child}/fd`).catch(() => [])) {
      const m = (await readlink(`/proc/${child}/fd/${fd}`).catch(() => '')).match(/^socket:\[(\d+)\]$/);
      if (m && listening.has(m[1])) return Number(child);
    }
  }
  throw new Error(`no child of ${pid} listens on ${url}`);
}

/**
 * A TCP proxy to target: cut() drops every connection through it and
 * refuses new ones until up(), as a network outage would.
 */
async function startProxy(target) {
  const sockets = new Set();
  let down = false;
  let refused = [];
  const server = createServer((client) => {
    if (down) {
      for (const res of refused.splice(0)) res();
      return client.destroy();
    }
    const upstream = tcpConnect(Number(target.port), target.hostname);
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('error', () => {});
      s.on('close', () => {
        sockets.delete(s);
        client.destroy();
        upstream.destroy();
      });
    }
    client.pipe(upstream).pipe(client);
  });
  await new Promise((res) => server.listen(0, '127.0.0.1', res));
  return {
    url: `http://127.0.0.1:${server.address().port}/`,
    /** Resolves at the next connection refused while cut. */
    nextRefused: () => new Promise((res) => refused.push(res)),
    cut() {
      down = true;
      for (const s of sockets) s.destroy();
    },
    up() {
      down = false;
    },
    close() {
      this.cut();
      server.close();
    },
  };
}

/** The items a page shows, as {title, done}. */
const shownItems = (page) => page.$$eval('#items li', (lis) => lis.map((li) => ({
  title: li.querySelector('.title').value,
  done: li.querySelector('.tick').checked,
})));

// Waits poll on a timer, not on animation frames: a page in the background
// draws none. For the same reason a page is brought to the front before it
// is clicked (Playwright waits for two frames to see the target is stable).

/** Waits until the page shows exactly items (within ms). */
async function showsItems(page, items, ms = WAIT) {
  await page.waitForFunction((want) => {
    const lis = [...document.querySelectorAll('#items li')];
    return JSON.stringify(lis.map((li) => ({
      title: li.querySelector('.title').value,
      done: li.querySelector('.tick').checked,
    }))) === JSON.stringify(want);
  }, items, { timeout: ms, polling: 20 }).catch(async (err) => {
    throw new Error(`${page.url()} shows ${JSON.stringify(await shownItems(page))}, want ${JSON.stringify(items)} (${err.message})`);
  });
}

/** Waits until the page highlights the item titled title as changed. */
const flashes = (page, title) => page.waitForFunction(
  (title) => [...document.querySelectorAll('#items li.changed .title')].some((t) => t.value === title),
  title, { timeout: WAIT, polling: 20 },
);
const inState = (page, state) => page.waitForSelector(`#state[data-state="${state}"]`, { timeout: WAIT });
const showsError = (page, text) => page.waitForFunction(
  (text) => !document.getElementById('error').hidden && document.getElementById('error').textContent.includes(text),
  text, { timeout: WAIT, polling: 20 },
);

/** Opens a page, recording uncaught errors and server errors (5xx). */
async function open(url, problems) {
  const page = await context.newPage();
  page.on('pageerror', (err) => problems.push(`${url}: ${err.message}`));
  page.on('response', (res) => {
    if (res.status() >= 500) problems.push(`${res.request().method()} ${res.url()}: ${res.status()}`);
  });
  await page.goto(url);
  return page;
}

test('two pages on two servers stay in sync, across a cut connection', async (t) => {
  const problems = [];
  const a = await open(todo.urls[0], problems);
  await a.fill('#new-list input', 'Groceries');
  await a.press('#new-list input', 'Enter');
  await a.waitForURL(/\/lists\/[0-9a-f]+$/);
  const listPath = new URL(a.url()).pathname;

  const b = await open(new URL(listPath, proxyB.url).href, problems);
  await inState(a, 'connected');
  await inState(b, 'connected');
  assert.equal(await b.textContent('#list-title'), 'Groceries');

  // Added in A, shown in B within a second.
  await a.fill('#new-item input', 'Milk');
  await a.press('#new-item input', 'Enter');
  await showsItems(b, [{ title: 'Milk', done: false }], 1000);
  // The list is a collection: B learns which item was added and flashes it;
  // A, which added it, does not flash its own change.
  await flashes(b, 'Milk');
  await showsItems(a, [{ title: 'Milk', done: false }]);
  assert.deepEqual(await a.$$eval('#items li.changed', (lis) => lis.length), 0, 'A flashed its own change');
  await a.fill('#new-item input', 'Bread');
  await a.press('#new-item input', 'Enter');
  await showsItems(b, [{ title: 'Milk', done: false }, { title: 'Bread', done: false }], 1000);

  // B's connection is cut; A edits, ticks, adds and deletes meanwhile.
  proxyB.cut();
  await inState(b, 'disconnected');
  await a.bringToFront();
  await a.fill('#items li:nth-child(1) .title', 'Oat milk');
  await a.press('#items li:nth-child(1) .title', 'Enter');
  // (The edit's push could otherwise untick the box under check()'s feet.)
  await showsItems(a, [{ title: 'Oat milk', done: false }, { title: 'Bread', done: false }]);
  await a.check('#items li:nth-child(1) .tick');
  await showsItems(a, [{ title: 'Oat milk', done: true }, { title: 'Bread', done: false }]);
  await a.click('#items li:nth-child(2) .delete');
  await a.fill('#new-item input', 'Eggs');
  await a.press('#new-item input', 'Enter');
  const latest = [{ title: 'Oat milk', done: true }, { title: 'Eggs', done: false }];
  await showsItems(a, latest);
  assert.deepEqual(await shownItems(b), [{ title: 'Milk', done: false }, { title: 'Bread', done: false }],
    'B cannot have seen the changes while cut');

  // B reconnects by itself and shows the latest.
  proxyB.up();
  await inState(b, 'connected');
  await showsItems(b, latest);

  // And a change made in B reaches A.
  await b.bringToFront();
  await b.uncheck('#items li:nth-child(1) .tick');
  await showsItems(a, [{ title: 'Oat milk', done: false }, { title: 'Eggs', done: false }], 1000);
  await flashes(a, 'Oat milk'); // modified by B

  await mkdir(artefacts, { recursive: true });
  for (const [name, page] of [['a', a], ['b', b]]) {
    const path = join(artefacts, `todo-page-${name}.png`);
    await page.screenshot({ path });
    t.diagnostic(`screenshot: ${path}`);
  }
  assert.deepEqual(problems, []);
});

test('bad input gets a clear message on the page, never a server error', async () => {
  const problems = [];
  const home = await open(todo.urls[0], problems);
  await home.press('#new-list input', 'Enter');
  await showsError(home, 'the title is empty');

  await home.fill('#new-list input', 'Chores');
  await home.press('#new-list input', 'Enter');
  await home.waitForURL(/\/lists\/[0-9a-f]+$/);
  const page = home;
  await page.fill('#new-item input', 'x'.repeat(10_000));
  await page.press('#new-item input', 'Enter');
  await showsError(page, 'the title is too long: 10000 characters, at most 200');
  // The refused text is not lost: it stays listed, with the reason, until
  // discarded.
  assert.match(await page.textContent('#pending li.failed'), /not added: the title is too long/);
  await page.click('#pending li.failed .discard');
  assert.equal(await page.$$eval('#pending li', (lis) => lis.length), 0);

  await page.fill('#new-item input', 'Dishes');
  await page.press('#new-item input', 'Enter');
  await showsItems(page, [{ title: 'Dishes', done: false }]);
  // A successful action clears the message (once its answer is in: the push
  // may come first).
  await page.waitForSelector('#error', { state: 'hidden', timeout: WAIT });

  // Emptying an item's title is refused, and the title comes back.
  await page.fill('#items li:nth-child(1) .title', '');
  await page.press('#items li:nth-child(1) .title', 'Enter');
  await showsError(page, 'the title is empty');
  assert.equal(await page.inputValue('#items li:nth-child(1) .title'), 'Dishes');

  const unknown = await open(new URL('/lists/nope', todo.urls[1]).href, problems);
  await showsError(unknown, 'no list "nope"');
  assert.equal(await unknown.isHidden('#list'), true);

  assert.deepEqual(problems, []);
});

test('items typed in quick succession are all saved, in order, while adds are in flight', async () => {
  const problems = [];
  const a = await open(todo.urls[0], problems);
  await a.fill('#new-list input', 'Quick');
  await a.press('#new-list input', 'Enter');
  await a.waitForURL(/\/lists\/[0-9a-f]+$/);
  const b = await open(new URL(new URL(a.url()).pathname, todo.urls[1]).href, problems);
  await inState(b, 'connected');

  // A slow network: each add's answer comes back while the next title is
  // being typed (the page once cleared the box when an answer came, so the
  // text typed since was lost or an empty title sent).
  await a.route('**/api/lists/*/items', async (route) => {
    await new Promise((res) => setTimeout(res, 40));
    await route.continue();
  });
  await a.bringToFront();
  const titles = Array.from({ length: 10 }, (_, i) => `Item ${i + 1}`);
  const input = a.locator('#new-item input');
  for (const title of titles) {
    await input.pressSequentially(title, { delay: 5 });
    await input.press('Enter');
  }
  const want = titles.map((title) => ({ title, done: false }));
  await showsItems(a, want);
  await showsItems(b, want);
  await a.waitForFunction(() => document.querySelectorAll('#pending li').length === 0, null, { timeout: WAIT, polling: 20 });
  assert.equal(await a.isHidden('#error'), true, `A shows an error: ${await a.textContent('#error')}`);
  assert.equal(await input.inputValue(), '');
  assert.deepEqual(problems, []);
});

test('cut off, the badge counts down to the next retry with a Retry now button; once back, the banner goes and the add is sent', async () => {
  const problems = [];
  const a = await open(todo.urls[0], problems);
  await a.fill('#new-list input', 'Outage');
  await a.press('#new-list input', 'Enter');
  await a.waitForURL(/\/lists\/[0-9a-f]+$/);
  const b = await open(new URL(new URL(a.url()).pathname, proxyB.url).href, problems);
  await inState(b, 'connected');
  // Every state the badge shows, in order (each change once).
  await b.evaluate(() => {
    const badge = document.getElementById('state');
    const seen = window.badgeStates = [badge.dataset.state];
    new MutationObserver(() => seen.at(-1) !== badge.dataset.state && seen.push(badge.dataset.state))
      .observe(badge, { attributes: true, attributeFilter: ['data-state'] });
  });

  proxyB.cut();
  await inState(b, 'disconnected');
  await b.waitForSelector('#retry-now', { state: 'visible', timeout: WAIT });
  await b.bringToFront();
  await b.fill('#new-item input', 'Candles');
  await b.press('#new-item input', 'Enter');
  await showsError(b, 'cannot reach the server');
  await b.waitForSelector('#pending li.failed', { timeout: WAIT });

  // The attempts back off; once the next is over 2 s away, Retry now makes
  // one at once.
  const waiting = await b.waitForFunction(() => {
    const m = document.getElementById('state').textContent.match(/^disconnected · retrying in (\d+) s$/);
    return m && Number(m[1]) >= 3 && Number(m[1]);
  }, null, { timeout: 60000, polling: 50 });
  const left = await waiting.jsonValue();
  const attempt = proxyB.nextRefused();
  await b.click('#retry-now');
  await withTimeout(attempt, 1500, `an attempt after Retry now (the next was ${left} s away)`);
  await inState(b, 'disconnected');

  // Back: Retry now connects, the banner goes, the add that failed is sent.
  proxyB.up();
  await b.waitForSelector('#retry-now', { state: 'visible', timeout: WAIT });
  await b.click('#retry-now');
  await inState(b, 'connected');
  await b.waitForSelector('#error', { state: 'hidden', timeout: WAIT });
  await showsItems(b, [{ title: 'Candles', done: false }]);
  await showsItems(a, [{ title: 'Candles', done: false }]);
  assert.equal(await b.$$eval('#pending li', (lis) => lis.length), 0);

  // Between losing the connection and getting it back, the badge said
  // "disconnected" throughout: it never flickered back to "connecting".
  const states = await b.evaluate(() => window.badgeStates);
  const lost = states.indexOf('disconnected');
  assert.deepEqual(states.slice(lost), ['disconnected', 'connected'], `badge states ${states}`);
  assert.deepEqual(problems, []);
});

test('an add whose answer was lost is sent again with its key and saved once', async () => {
  const problems = [];
  const a = await open(todo.urls[0], problems);
  await a.fill('#new-list input', 'Once');
  await a.press('#new-list input', 'Enter');
  await a.waitForURL(/\/lists\/[0-9a-f]+$/);
  const b = await open(new URL(new URL(a.url()).pathname, todo.urls[1]).href, problems);
  await inState(b, 'connected');

  // The first add reaches the server, which saves it, but the connection is
  // cut before the answer comes back: the page cannot tell it was saved.
  const sent = []; // the adds' bodies, as sent
  let cut = true;
  await a.route('**/api/lists/*/items', async (route) => {
    sent.push(route.request().postDataJSON());
    if (!cut) return route.continue();
    cut = false;
    await route.fetch();
    await route.abort('connectionreset');
  });
  await a.bringToFront();
  await a.fill('#new-item input', 'Milk');
  await a.press('#new-item input', 'Enter');
  await a.waitForSelector('#pending li.failed', { timeout: WAIT });
  await showsError(a, 'cannot reach the server');
  await showsItems(b, [{ title: 'Milk', done: false }]); // saved all the same

  // Sent again, with the same key: the server answers with the item it
  // saved, and adds none.
  await a.click('#pending li.failed .retry');
  await a.waitForFunction(() => document.querySelectorAll('#pending li').length === 0, null, { timeout: WAIT, polling: 20 });
  await a.waitForSelector('#error', { state: 'hidden', timeout: WAIT });
  // Another add after it: once it shows, a second Milk would have too.
  await a.fill('#new-item input', 'Bread');
  await a.press('#new-item input', 'Enter');
  const want = [{ title: 'Milk', done: false }, { title: 'Bread', done: false }];
  await showsItems(a, want);
  await showsItems(b, want);
  assert.equal(sent.length, 3);
  assert.match(sent[0].key, /^[0-9a-f]{32}$/);
  assert.deepEqual(sent[1], sent[0], 'the retry is the same add, key included');
  assert.notEqual(sent[2].key, sent[0].key, 'another add, another key');
  assert.deepEqual(problems, []);
});

test('an edit of an item someone changed meanwhile shows their change instead of overwriting it', async () => {
  const problems = [];
  const a = await open(todo.urls[0], problems);
  await a.fill('#new-list input', 'Conflicts');
  await a.press('#new-list input', 'Enter');
  await a.waitForURL(/\/lists\/[0-9a-f]+$/);
  await a.fill('#new-item input', 'Milk');
  await a.press('#new-item input', 'Enter');
  const b = await open(new URL(new URL(a.url()).pathname, todo.urls[1]).href, problems);
  await showsItems(b, [{ title: 'Milk', done: false }]);

  // B starts editing; meanwhile A saves another title.
  const titleB = '#items li:nth-child(1) .title';
  await b.bringToFront();
  await b.fill(titleB, 'Oat milk');
  await a.bringToFront();
  await a.fill('#items li:nth-child(1) .title', 'Soy milk');
  await a.press('#items li:nth-child(1) .title', 'Enter');
  await flashes(b, 'Oat milk'); // B got A's change (its field, being edited, keeps B's text)

  // B saves: refused, and B sees A's title beside its own text.
  await b.bringToFront();
  await b.press(titleB, 'Enter');
  await showsError(b, 'someone else changed this item meanwhile: it reads "Soy milk" now');
  await b.waitForSelector('#items li.conflict .conflict-note', { state: 'visible', timeout: WAIT });
  assert.equal(await b.textContent('#items li.conflict .theirs'), 'Soy milk');
  assert.equal(await b.inputValue(titleB), 'Oat milk');
  await showsItems(a, [{ title: 'Soy milk', done: false }]);

  // B keeps its text, knowingly: saved over A's.
  await b.click('#items li.conflict .keep');
  await showsItems(a, [{ title: 'Oat milk', done: false }]);
  await b.waitForSelector('#items .conflict-note', { state: 'hidden', timeout: WAIT });
  await b.waitForSelector('#error', { state: 'hidden', timeout: WAIT });

  // Again, and this time B takes A's title.
  await b.fill(titleB, 'Almond milk');
  await a.bringToFront();
  await a.fill('#items li:nth-child(1) .title', 'Rice milk');
  await a.press('#items li:nth-child(1) .title', 'Enter');
  await flashes(b, 'Almond milk');
  await b.bringToFront();
  await b.press(titleB, 'Enter');
  await b.waitForSelector('#items li.conflict .conflict-note', { state: 'visible', timeout: WAIT });
  await b.click('#items li.conflict .take');
  await showsItems(b, [{ title: 'Rice milk', done: false }]);
  await showsItems(a, [{ title: 'Rice milk', done: false }]);
  assert.equal(await b.isHidden('#error'), true);
  assert.deepEqual(problems, []);
});

test('the home page is live: a list created on the other server appears without a reload', async () => {
  const problems = [];
  const homeB = await open(todo.urls[1], problems);
  await inState(homeB, 'connected');
  const home = await open(todo.urls[0], problems);
  await home.fill('#new-list input', 'Created elsewhere');
  await home.press('#new-list input', 'Enter');
  await home.waitForURL(/\/lists\/[0-9a-f]+$/);
  const id = new URL(home.url()).pathname.split('/').pop();
  // Newest first, linking to the list.
  await homeB.waitForFunction(
    (id) => document.querySelector('#lists li')?.dataset.id === id,
    id, { timeout: WAIT, polling: 20 },
  );
  assert.equal(await homeB.textContent('#lists li:first-child a'), 'Created elsewhere');
  assert.equal(await homeB.getAttribute('#lists li:first-child a', 'href'), `/lists/${id}`);
  assert.deepEqual(problems, []);
});

test('one server killed: the other serves on, the launcher restarts it, and its page reconnects and catches up', { skip: process.platform !== 'linux' && 'finds the server through /proc' }, async () => {
  const problems = [];
  const a = await open(todo.urls[0], problems);
  await a.fill('#new-list input', 'Survivor');
  await a.press('#new-list input', 'Enter');
  await a.waitForURL(/\/lists\/[0-9a-f]+$/);
  const b = await open(new URL(new URL(a.url()).pathname, todo.urls[1]).href, problems);
  await inState(a, 'connected');
  await inState(b, 'connected');

  process.kill(await serverPid(todo.pid, todo.urls[0]), 'SIGKILL');
  await inState(a, 'disconnected');
  // B's server serves on meanwhile.
  await b.bringToFront();
  await b.fill('#new-item input', 'Added while A was down');
  await b.press('#new-item input', 'Enter');
  await showsItems(b, [{ title: 'Added while A was down', done: false }]);
  assert.equal(await b.getAttribute('#state', 'data-state'), 'connected');

  // A's server is back on its address; A reconnects and catches up.
  await inState(a, 'connected');
  await showsItems(a, [{ title: 'Added while A was down', done: false }]);
  await a.bringToFront();
  await a.fill('#new-item input', 'Added after');
  await a.press('#new-item input', 'Enter');
  await showsItems(b, [{ title: 'Added while A was down', done: false }, { title: 'Added after', done: false }]);
  assert.match(todo.output(), /todo: the server for 127\.0\.0\.1:\d+ stopped \(signal: killed\); restarting it/);
  assert.deepEqual(problems, []);
});
