// applyFrame on its own: how the client turns rows, gone, diff and
// unchanged frames into the rows it holds for a key and the changes it
// hands the application. Pure and fast; the same function the client runs.

import { test } from 'node:test';
import assert from 'node:assert/strict';

import { applyFrame, initialChanges } from '../../src/index.js';

const K = { entity: 'lists', id: '1' };

const rowsFrame = (version, entries) => ({
  type: 'rows',
  key: K,
  seq: 1,
  version,
  ids: entries.map(([id]) => id),
  rows: entries.map(([, row]) => row),
});

const diffFrame = (base, version, { upsert, remove, order } = {}) => {
  const f = { type: 'diff', key: K, seq: 2, base, version };
  if (upsert) f.upsert = upsert.map(([id, row]) => ({ id, row }));
  if (remove) f.remove = remove;
  if (order) f.order = order;
  return f;
};

/** Applies f to state and returns the result, which must be a state. */
function apply(state, f) {
  const out = applyFrame(state, f);
  assert.equal(out.kind, 'state', `expected a state, got ${JSON.stringify(out)}`);
  return out;
}

/** A state holding the given [id, row] entries at version v. */
const held = (v, entries) => apply(null, rowsFrame(v, entries)).state;

const a = { id: 'a', text: 'A' };
const b = { id: 'b', text: 'B' };
const c = { id: 'c', text: 'C' };
const d = { id: 'd', text: 'D' };

test('rows without ids: a plain key, no changes', () => {
  const out = apply(null, { type: 'rows', key: K, seq: 1, version: '0000000000000001', rows: [{ v: 1 }, 'text'] });
  assert.deepEqual(out.state.rows, [{ v: 1 }, 'text']);
  assert.equal(out.state.ids, null);
  assert.equal(out.state.version, '0000000000000001');
  assert.equal(out.state.gone, false);
  assert.deepEqual(out.changes, []);
  // A frame from an older server: no version, rows as today.
  const old = apply(out.state, { type: 'rows', key: K, seq: 2, rows: [{ v: 2 }] });
  assert.equal(old.state.version, undefined);
  assert.deepEqual(old.changes, []);
  assert.deepEqual(initialChanges(old.state), []);
});

test('first rows of a collection: every row added, in server order', () => {
  const out = apply(null, rowsFrame('v1', [['b', b], ['a', a]]));
  assert.deepEqual(out.state.rows, [b, a]);
  assert.deepEqual(out.state.ids, ['b', 'a']);
  assert.deepEqual(out.changes, [
    { type: 'added', id: 'b', row: b },
    { type: 'added', id: 'a', row: a },
  ]);
  assert.deepEqual(initialChanges(out.state), out.changes);
});

test('full rows on a held collection: changes by id, unchanged rows not reported', () => {
  const s1 = held('v1', [['a', a], ['b', b], ['c', c]]);
  const b2 = { id: 'b', text: 'B2' };
  const out = apply(s1, rowsFrame('v2', [['d', d], ['b', b2], ['a', { text: 'A', id: 'a' }], ['c', { ...c }]]));
  assert.deepEqual(out.state.rows, [d, b2, { text: 'A', id: 'a' }, c]);
  // a's fields in another order is another encoding: modified. c is equal.
  assert.deepEqual(out.changes, [
    { type: 'added', id: 'd', row: d },
    { type: 'modified', id: 'b', row: b2 },
    { type: 'modified', id: 'a', row: { text: 'A', id: 'a' } },
  ]);
  const out2 = apply(out.state, rowsFrame('v3', [['b', b2]]));
  assert.deepEqual(out2.changes, [
    { type: 'removed', id: 'd', row: d },
    { type: 'removed', id: 'a', row: { text: 'A', id: 'a' } },
    { type: 'removed', id: 'c', row: c },
  ]);
});

test('a rows frame with bad ids is invalid', () => {
  const s1 = held('v1', [['a', a]]);
  for (const [ids, why] of [
    [['a'], /parallel/],
    ['a,b', /parallel/],
    [['a', 7], /not a string/],
    [['a', 'a'], /twice/],
  ]) {
    const out = applyFrame(s1, { type: 'rows', key: K, seq: 2, version: 'v2', ids, rows: [a, b] });
    assert.equal(out.kind, 'invalid');
    assert.match(out.problem, why);
  }
});

test('gone: a held collection reports every row removed; a plain key nothing', () => {
  const s1 = held('v1', [['a', a], ['b', b]]);
  const out = apply(s1, { type: 'gone', key: K, seq: 2, version: 'e3b0c44298fc1c14' });
  assert.equal(out.state.gone, true);
  assert.deepEqual(out.state.rows, []);
  assert.equal(out.state.version, 'e3b0c44298fc1c14');
  assert.deepEqual(out.changes, [
    { type: 'removed', id: 'a', row: a },
    { type: 'removed', id: 'b', row: b },
  ]);
  const plain = apply(null, { type: 'rows', key: K, seq: 1, rows: [1] }).state;
  assert.deepEqual(apply(plain, { type: 'gone', key: K, seq: 2 }).changes, []);
  assert.deepEqual(apply(null, { type: 'gone', key: K, seq: 1 }).changes, []);
  // Back from gone: every row added.
  const back = apply(out.state, rowsFrame('v3', [['c', c]]));
  assert.equal(back.state.gone, false);
  assert.deepEqual(back.changes, [{ type: 'added', id: 'c', row: c }]);
});

test('a collection with zero rows is gone, whether by rows or by diff', () => {
  const empty = apply(null, rowsFrame('e', []));
  assert.equal(empty.state.gone, true);
  const s1 = held('v1', [['a', a]]);
  const out = apply(s1, diffFrame('v1', 'e', { remove: ['a'] }));
  assert.equal(out.state.gone, true);
  assert.deepEqual(out.changes, [{ type: 'removed', id: 'a', row: a }]);
});

test('diff: remove, replace in place, append new ids in the order given', () => {
  const s1 = held('v1', [['a', a], ['b', b], ['c', c]]);
  const a2 = { id: 'a', text: 'A2' };
  const e = { id: 'e', text: 'E' };
  const out = apply(s1, diffFrame('v1', 'v2', { remove: ['b'], upsert: [['e', e], ['a', a2], ['d', d]] }));
  assert.deepEqual(out.state.ids, ['a', 'c', 'e', 'd']);
  assert.deepEqual(out.state.rows, [a2, c, e, d]);
  assert.equal(out.state.version, 'v2');
  // Removed rows in their old order, then the rest in the new order.
  assert.deepEqual(out.changes, [
    { type: 'removed', id: 'b', row: b },
    { type: 'modified', id: 'a', row: a2 },
    { type: 'added', id: 'e', row: e },
    { type: 'added', id: 'd', row: d },
  ]);
});

test('diff: upsert and remove may be absent; an order-only diff reorders and reports no change', () => {
  const s1 = held('v1', [['a', a], ['b', b], ['c', c]]);
  const out = apply(s1, diffFrame('v1', 'v2', { order: ['c', 'a', 'b'] }));
  assert.deepEqual(out.state.rows, [c, a, b]);
  assert.deepEqual(out.changes, []);
  const same = apply(s1, diffFrame('v1', 'v1b', {}));
  assert.deepEqual(same.state.rows, [a, b, c]);
  assert.equal(same.state.version, 'v1b');
});

test('diff: order applies after removes and upserts', () => {
  const s1 = held('v1', [['a', a], ['b', b], ['c', c]]);
  const out = apply(s1, diffFrame('v1', 'v2', { remove: ['a'], upsert: [['d', d]], order: ['d', 'c', 'b'] }));
  assert.deepEqual(out.state.ids, ['d', 'c', 'b']);
  assert.deepEqual(out.state.rows, [d, c, b]);
  assert.deepEqual(out.changes, [
    { type: 'removed', id: 'a', row: a },
    { type: 'added', id: 'd', row: d },
  ]);
});

test('diff: the same id upserted twice is one change with the last row, at the first place', () => {
  const s1 = held('v1', [['a', a], ['b', b]]);
  const d1 = { id: 'd', text: 'D1' };
  const d2 = { id: 'd', text: 'D2' };
  const a1 = { id: 'a', text: 'A1' };
  const a2 = { id: 'a', text: 'A2' };
  const out = apply(s1, diffFrame('v1', 'v2', { upsert: [['d', d1], ['a', a1], ['c', c], ['d', d2], ['a', a2]] }));
  assert.deepEqual(out.state.ids, ['a', 'b', 'd', 'c']);
  assert.deepEqual(out.state.rows, [a2, b, d2, c]);
  assert.deepEqual(out.changes, [
    { type: 'modified', id: 'a', row: a2 },
    { type: 'added', id: 'd', row: d2 },
    { type: 'added', id: 'c', row: c },
  ]);
  // Upserted twice and back to the row held: no change.
  const back = apply(s1, diffFrame('v1', 'v3', { upsert: [['a', a1], ['a', { ...a }]] }));
  assert.deepEqual(back.changes, []);
});

test('diff: an id removed and upserted again moves to the end; modified only if its row differs', () => {
  const s1 = held('v1', [['a', a], ['b', b], ['c', c]]);
  const moved = apply(s1, diffFrame('v1', 'v2', { remove: ['a'], upsert: [['a', { ...a }]] }));
  assert.deepEqual(moved.state.ids, ['b', 'c', 'a']);
  assert.deepEqual(moved.changes, []);
  const a2 = { id: 'a', text: 'A2' };
  const changed = apply(s1, diffFrame('v1', 'v3', { remove: ['a', 'a'], upsert: [['a', a2]] }));
  assert.deepEqual(changed.state.ids, ['b', 'c', 'a']);
  assert.deepEqual(changed.changes, [{ type: 'modified', id: 'a', row: a2 }]);
});

test('diff: removing an id not held does nothing; an identical upsert reports nothing', () => {
  const s1 = held('v1', [['a', a]]);
  const out = apply(s1, diffFrame('v1', 'v2', { remove: ['zz'], upsert: [['a', { id: 'a', text: 'A' }]] }));
  assert.deepEqual(out.state.rows, [a]);
  assert.deepEqual(out.changes, []);
});

test('diff onto a gone state (an empty collection) adds rows', () => {
  const gone = apply(held('v1', [['a', a]]), { type: 'gone', key: K, seq: 2, version: 'e' }).state;
  const out = apply(gone, diffFrame('e', 'v3', { upsert: [['b', b]] }));
  assert.deepEqual(out.state.rows, [b]);
  assert.equal(out.state.gone, false);
  assert.deepEqual(out.changes, [{ type: 'added', id: 'b', row: b }]);
  // A gone that came first (the key never had ids) takes a diff too.
  const first = apply(null, { type: 'gone', key: K, seq: 1, version: 'e' }).state;
  assert.deepEqual(apply(first, diffFrame('e', 'v4', { upsert: [['b', b]] })).state.rows, [b]);
});

test('diff from another base: resubscribe with the version held, apply nothing', () => {
  const s1 = held('v1', [['a', a]]);
  const snapshot = JSON.stringify([s1.ids, s1.rows, [...s1.entries]]);
  const out = applyFrame(s1, diffFrame('v0', 'v2', { remove: ['a'] }));
  assert.deepEqual(out, { kind: 'resync', version: 'v1' });
  assert.equal(JSON.stringify([s1.ids, s1.rows, [...s1.entries]]), snapshot);
  // Nothing held: ask for the full state.
  assert.deepEqual(applyFrame(null, diffFrame('v0', 'v2', {})), { kind: 'resync', version: undefined });
  // Held without a version (an older server's frame): no base can match.
  const noVersion = apply(null, { type: 'rows', key: K, seq: 1, ids: ['a'], rows: [a] }).state;
  assert.deepEqual(applyFrame(noVersion, diffFrame(undefined, 'v2', {})), { kind: 'resync', version: undefined });
});

test('an invalid diff: resubscribe for the full state, apply nothing', () => {
  const s1 = held('v1', [['a', a], ['b', b]]);
  const cases = [
    [diffFrame('v1', 'v2', { order: ['a'] }), /order/],
    [diffFrame('v1', 'v2', { order: ['a', 'a'] }), /order/],
    [diffFrame('v1', 'v2', { order: ['a', 'x'] }), /order/],
    [{ ...diffFrame('v1', 'v2'), remove: 'a' }, /remove/],
    [{ ...diffFrame('v1', 'v2'), remove: [1] }, /remove/],
    [{ ...diffFrame('v1', 'v2'), upsert: {} }, /upsert/],
    [{ ...diffFrame('v1', 'v2'), upsert: [{ id: 'a' }] }, /upsert/],
    [{ ...diffFrame('v1', 'v2'), upsert: [{ id: 3, row: {} }] }, /upsert/],
    [{ ...diffFrame('v1', 'v2'), upsert: [null] }, /upsert/],
  ];
  for (const [f, why] of cases) {
    const out = applyFrame(s1, f);
    assert.equal(out.kind, 'resync', JSON.stringify(f));
    assert.equal(out.version, undefined);
    assert.match(out.problem, why);
  }
  assert.deepEqual(s1.rows, [a, b]);
  // A key held without ids cannot take a diff even from the right base.
  const plain = apply(null, { type: 'rows', key: K, seq: 1, version: 'p1', rows: [a] }).state;
  const out = applyFrame(plain, diffFrame('p1', 'p2', { upsert: [['a', a]] }));
  assert.equal(out.kind, 'resync');
  assert.equal(out.version, undefined);
  assert.match(out.problem, /without row ids/);
});

test('unchanged: kept when it names the version held, otherwise resubscribe', () => {
  const s1 = held('v1', [['a', a]]);
  assert.deepEqual(applyFrame(s1, { type: 'unchanged', key: K, seq: 3, version: 'v1' }), { kind: 'unchanged', state: s1 });
  assert.deepEqual(applyFrame(s1, { type: 'unchanged', key: K, seq: 3, version: 'v9' }), { kind: 'resync', version: 'v1' });
  assert.deepEqual(applyFrame(null, { type: 'unchanged', key: K, seq: 3, version: 'v1' }), { kind: 'resync', version: undefined });
});

test('an empty diff back to the version held is unchanged: nothing to report', () => {
  const s1 = held('v1', [['a', a]]);
  assert.deepEqual(applyFrame(s1, diffFrame('v1', 'v1', {})), { kind: 'unchanged', state: s1 });
  // From another base it is still a resubscribe, never applied.
  assert.equal(applyFrame(s1, diffFrame('v0', 'v0', {})).kind, 'resync');
});

test('the held state is never changed, and the rows handed out are not read back', () => {
  const s1 = held('v1', [['a', a], ['b', b]]);
  assert.ok(Object.isFrozen(s1));
  s1.rows.reverse(); // the application may do what it likes with its array
  s1.rows.push('junk');
  const out = apply(s1, diffFrame('v1', 'v2', { upsert: [['c', c]], remove: ['a'] }));
  assert.deepEqual(out.state.rows, [b, c]);
  assert.deepEqual(s1.ids, ['a', 'b']);
  assert.equal(s1.entries.size, 2);
  assert.throws(() => applyFrame(s1, { type: 'ack' }), TypeError);
});

// --- randomized: diffs built as the spec says a server builds them ---

/** A small deterministic PRNG (mulberry32), so a failure can be replayed. */
function rng(seed) {
  return () => {
    seed |= 0;
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * The diff from entries `from` to entries `to` (arrays of [id, row]), as the
 * spec describes: removed ids, changed or new rows in their new order, and
 * `order` only when removing and upserting would not already give it.
 */
function specDiff(from, to, base, version) {
  const before = new Map(from.map(([id, row]) => [id, JSON.stringify(row)]));
  const after = new Set(to.map(([id]) => id));
  const remove = from.map(([id]) => id).filter((id) => !after.has(id));
  const upsert = to.filter(([id, row]) => before.get(id) !== JSON.stringify(row));
  const kept = from.map(([id]) => id).filter((id) => after.has(id));
  const appended = upsert.map(([id]) => id).filter((id) => !before.has(id));
  const natural = [...kept, ...appended];
  const wanted = to.map(([id]) => id);
  const order = natural.join('\u0000') === wanted.join('\u0000') ? undefined : wanted;
  return diffFrame(base, version, { upsert, remove, order });
}

/** The next collection: rows inserted, updated, deleted and moved at random. */
function mutate(entries, rand, nextID) {
  const out = entries.map(([id, row]) => [id, row]);
  const ops = 1 + Math.floor(rand() * 4);
  for (let i = 0; i < ops; i++) {
    const r = rand();
    if (r < 0.3 || out.length === 0) {
      const id = `r${nextID()}`;
      out.splice(Math.floor(rand() * (out.length + 1)), 0, [id, { id, n: Math.floor(rand() * 5) }]);
    } else if (r < 0.6) {
      const j = Math.floor(rand() * out.length);
      out[j] = [out[j][0], { id: out[j][0], n: Math.floor(rand() * 5) }]; // sometimes the same value
    } else if (r < 0.85) {
      out.splice(Math.floor(rand() * out.length), 1);
    } else {
      const [moved] = out.splice(Math.floor(rand() * out.length), 1);
      out.splice(Math.floor(rand() * (out.length + 1)), 0, moved);
    }
  }
  return out;
}

test('randomized: diffs and full rows give the same rows and the same changes (in the same order), and changes replay to the rows', () => {
  for (let seed = 1; seed <= 200; seed++) {
    const rand = rng(seed);
    let n = 0;
    const nextID = () => ++n;
    let entries = [];
    let state = apply(null, { type: 'gone', key: K, seq: 0, version: 'g0' }).state;
    let version = 'g0';
    const model = new Map(); // what an application keeps from the changes alone
    for (let step = 1; step <= 30; step++) {
      const next = mutate(entries, rand, nextID);
      const v = `v${step}`;
      const viaDiff = apply(state, specDiff(entries, next, version, v));
      const viaRows = next.length === 0
        ? apply(state, { type: 'gone', key: K, seq: step, version: v })
        : apply(state, rowsFrame(v, next));
      const where = `seed ${seed} step ${step}`;
      assert.deepEqual(viaDiff.state.ids, next.map(([id]) => id), where);
      assert.deepEqual(viaDiff.state.rows, next.map(([, row]) => row), where);
      assert.equal(viaDiff.state.gone, next.length === 0, where);
      assert.deepEqual(viaDiff.changes, viaRows.changes, where);
      for (const ch of viaDiff.changes) {
        if (ch.type === 'removed') {
          assert.ok(model.delete(ch.id), `${where}: removed ${ch.id}, which was not held`);
        } else {
          assert.equal(model.has(ch.id), ch.type === 'modified', `${where}: ${ch.type} ${ch.id}`);
          model.set(ch.id, ch.row);
        }
      }
      assert.deepEqual(new Map(next), model, where);
      entries = next;
      state = viaDiff.state;
      version = v;
    }
  }
});
