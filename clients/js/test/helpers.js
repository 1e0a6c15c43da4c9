// Shared by the node and browser tests: starts the Go test server
// (testserver/main.go) and records callbacks as awaitable events.

import { spawn, execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';
import { promisify } from 'node:util';

export const jsRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..');
export const repoRoot = resolve(jsRoot, '..', '..');

/** Every wait in the tests is bounded by this. */
export const WAIT = 15000;

/**
 * Builds (through Go's build cache) and starts the test server: an embedded
 * nsqd and two entity-sync servers behind cuttable proxies. Returns its
 * addresses, a `control(path)` helper for its HTTP API, `list(...)` for its
 * lists and `stop()`.
 */
export async function startTestServer() {
  const dir = await mkdtemp(join(tmpdir(), 'es-js-test-'));
  const bin = join(dir, 'testserver');
  const build = process.env.ES_TESTSERVER;
  if (!build) {
    await promisify(execFile)('go', ['build', '-o', bin, './clients/js/testserver'], { cwd: repoRoot });
  }
  const child = spawn(build || bin, ['-root', jsRoot], { stdio: ['pipe', 'pipe', 'inherit'] });
  const exited = new Promise((res) => child.once('exit', res));
  const lines = createInterface({ input: child.stdout });
  const first = await withTimeout(
    new Promise((res, rej) => {
      lines.once('line', res);
      child.once('exit', (code) => rej(new Error(`test server exited with ${code} before printing its addresses`)));
    }),
    60000,
    'test server start',
  );
  lines.close();
  const info = JSON.parse(first);
  async function control(path) {
    const res = await fetch(info.control + path);
    const body = await res.json();
    if (!res.ok) throw new Error(`control ${path}: ${body.error}`);
    return body;
  }
  /** Changes list L (op add, set, remove, move, fill: see testserver/lists.go) through server i; returns its rows after. */
  async function list(i, id, op, params = {}) {
    return (await control(`/list?${new URLSearchParams({ server: i, list: id, op, ...params })}`)).rows;
  }
  async function stop() {
    child.stdin.end(); // the server exits at EOF on stdin
    const timer = setTimeout(() => child.kill('SIGKILL'), 15000);
    await exited;
    clearTimeout(timer);
    await rm(dir, { recursive: true, force: true });
  }
  return { ...info, control, list, stop };
}

/**
 * Starts headless Chromium (Debian's, CHROMIUM_PATH to override) with a
 * fresh profile. Returns a playwright-core BrowserContext whose close()
 * also removes the profile.
 */
export async function launchChromium() {
  const { chromium } = await import('playwright-core');
  const executablePath = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
  if (!existsSync(executablePath)) {
    throw new Error(`no Chromium at ${executablePath}: run scripts/test.sh (installs Debian's chromium) or set CHROMIUM_PATH`);
  }
  const profile = await mkdtemp(join(tmpdir(), 'es-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  const close = context.close.bind(context);
  context.close = async () => {
    await close();
    await rm(profile, { recursive: true, force: true });
  };
  return context;
}

/** Rejects with a message naming what did not happen within ms. */
export function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, rej) => {
    timer = setTimeout(() => rej(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Collects events and lets a test await them in order. */
export class Recorder {
  #events = [];
  #waiter = null;

  push(e) {
    this.#events.push(e);
    if (this.#waiter) {
      const w = this.#waiter;
      this.#waiter = null;
      w();
    }
  }

  /** Subscription handlers that record rows, gone, revoked and error events. */
  handlers() {
    return {
      onRows: (rows) => this.push({ kind: 'rows', rows }),
      onGone: () => this.push({ kind: 'gone' }),
      onRevoked: (reason) => this.push({ kind: 'revoked', reason }),
      onError: (err) => this.push({ kind: 'error', err }),
    };
  }

  /** The next event not yet consumed. */
  async next(what = 'an event') {
    while (this.#events.length === 0) {
      await withTimeout(new Promise((res) => (this.#waiter = res)), WAIT, what);
    }
    return this.#events.shift();
  }

  /** Consumes events until one matches pred, and returns it. */
  async until(pred, what) {
    for (;;) {
      const e = await this.next(what);
      if (pred(e)) return e;
    }
  }

  /** The events not consumed yet (consuming them). */
  drain() {
    return this.#events.splice(0);
  }
}

/**
 * Reads rows events until one shows version >= v of the item, checking that
 * versions never go back. Returns the row.
 */
export async function awaitVersion(rec, v, state = { last: -1 }) {
  for (;;) {
    const e = await rec.next(`version ${v}`);
    if (e.kind !== 'rows') throw new Error(`got ${e.kind} (${e.err ?? e.reason ?? ''}) while waiting for version ${v}`);
    const row = e.rows[0];
    if (row.v < state.last) throw new Error(`version went back from ${state.last} to ${row.v}`);
    state.last = row.v;
    if (row.v >= v) return row;
  }
}
