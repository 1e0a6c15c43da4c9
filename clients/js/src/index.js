// @entity-sync/client: the JavaScript client of entity-sync's envelope
// protocol (websocket subprotocol "entitysync.v1"; see docs/protocol.md in
// the entity-sync repository). No dependencies; runs in browsers and in
// Node.js 20+ (pass a WebSocket constructor, such as the `ws` package's, where
// there is no global one). Keeps the rows of collection keys by id, applies
// the server's diffs and resumes from the version it holds (applyFrame).

/** The websocket subprotocol the client offers and requires. */
export const SUBPROTOCOL = 'entitysync.v1';

/** Where entity-sync servers serve their websocket endpoint by default. */
export const PATH = '/ws/entity-sync/';

/** Connection states, as passed to 'state' listeners. */
export const State = Object.freeze({
  /** Opening the websocket or waiting for the server's welcome. */
  CONNECTING: 'connecting',
  /** Welcomed; the secret and every subscription have been queued (sent paced within the server's rate limit). */
  CONNECTED: 'connected',
  /** The connection ended or an attempt failed; a retry is scheduled. */
  DISCONNECTED: 'disconnected',
  /** close() was called. */
  CLOSED: 'closed',
});

/** A request the server refused (an `error` frame), or a client-side failure. */
export class EntitySyncError extends Error {
  /**
   * @param {string} code e.g. 'forbidden', 'unknown_entity', 'rate_limited'
   * @param {string} message
   * @param {{action?: string, key?: {entity: string, id: string}}} [about]
   */
  constructor(code, message, about = {}) {
    super(message);
    this.name = 'EntitySyncError';
    this.code = code;
    this.action = about.action;
    this.key = about.key;
  }
}

/**
 * Opens a client. It connects in the background and keeps reconnecting
 * until close(); subscribe right away, subscriptions are sent once connected.
 * @param {string} url ws:, wss:, http:, https: or (in a browser) a path such as '/ws/entity-sync/'
 * @param {object} [options] see EntitySyncClient
 */
export function connect(url, options = {}) {
  return new EntitySyncClient(url, options);
}

const keyString = (entity, id) => JSON.stringify([entity, id]);

// Added to twice the server's heartbeat interval to make the silence limit:
// room for a late timer on the server and for network jitter, so one late
// heartbeat is not taken for a dead connection.
const HEARTBEAT_SLACK = 1000;

// At most this many requests await their ack or error at a time. The server
// bounds the answers it holds for a connection and drops one whose unread
// answers pile up (it takes that for a client that does not read them).
// That bound need not cover a full burst (an esweb that queued 64 answers
// with a default burst of 100 dropped a page that sent a full burst while
// busy, although it read everything); a small window keeps a reading client
// clear of it whatever the burst.
const MAX_IN_FLIGHT = 32;

/** The client. Use connect() to make one. */
export class EntitySyncClient {
  #url;
  #WebSocket;
  #minBackoff;
  #maxBackoff;
  #healthyAfter;
  #handshakeTimeout;
  #state = State.CONNECTING;
  #closed = false;
  #secret;
  /** @type {Map<string, Sub>} */
  #subs = new Map();
  #conn = null;
  #attempt = 0;
  #retryTimer = null;
  #listeners = { state: new Set(), error: new Set() };
  #onOnline = null;

  /**
   * @param {string} url
   * @param {object} [options]
   * @param {Function} [options.WebSocket] WebSocket constructor; default globalThis.WebSocket
   * @param {string} [options.secret] sent first on every connection
   * @param {number} [options.minBackoff=500] first reconnect delay ceiling, ms
   * @param {number} [options.maxBackoff=20000] largest reconnect delay ceiling, ms
   * @param {number} [options.healthyAfter=5000] ms a connection must stay open after its welcome for the backoff to start afresh
   * @param {number} [options.handshakeTimeout=10000] ms to open and be welcomed
   * @param {(state: string, info?: object) => void} [options.onStateChange]
   * @param {(err: Error) => void} [options.onError]
   */
  constructor(url, options = {}) {
    const WS = options.WebSocket ?? globalThis.WebSocket;
    if (typeof WS !== 'function') {
      throw new TypeError('entity-sync: no WebSocket available; pass options.WebSocket (e.g. the "ws" package on Node.js)');
    }
    this.#WebSocket = WS;
    this.#url = resolveURL(url);
    this.#minBackoff = positive(options.minBackoff, 500);
    this.#maxBackoff = Math.max(positive(options.maxBackoff, 20000), this.#minBackoff);
    this.#healthyAfter = positive(options.healthyAfter, 5000);
    this.#handshakeTimeout = positive(options.handshakeTimeout, 10000);
    this.#secret = options.secret ?? '';
    if (options.onStateChange) this.#listeners.state.add(options.onStateChange);
    if (options.onError) this.#listeners.error.add(options.onError);
    if (typeof globalThis.addEventListener === 'function') {
      // A browser that comes back online retries at once instead of waiting
      // out its backoff.
      this.#onOnline = () => this.reconnect();
      globalThis.addEventListener('online', this.#onOnline);
    }
    this.#open();
  }

  /** The current connection state (see State). */
  get state() {
    return this.#state;
  }

  /**
   * Adds a listener: 'state' listeners get (state, info) on every change of
   * connection state (when disconnected, info holds {code, reason} of the
   * close or {error}, and retryIn: ms until the next attempt); 'error'
   * listeners get errors that belong to no
   * subscription. Returns a function that removes the listener.
   * @param {'state'|'error'} event
   * @param {Function} fn
   * @returns {() => void}
   */
  on(event, fn) {
    const set = this.#listeners[event];
    if (!set) throw new TypeError(`entity-sync: unknown event ${event}`);
    set.add(fn);
    return () => set.delete(fn);
  }

  /**
   * Subscribes to the entity key (entity, id). onRows(rows, changes)
   * receives the key's rows (an array of parsed JSON values: all rows of one
   * change) now and after every change; onGone(changes) is called while the
   * key has no rows. For a collection key (the server names its rows by id)
   * `changes` lists what changed since the previous state this subscription
   * was handed: {type: 'added'|'modified'|'removed', id, row} (a removed row
   * carries its last value); for other keys it is empty. Instead of onRows a
   * handlers object may be passed:
   * {onRows, onGone, onRevoked(reason), onError(err)}.
   *
   * Several subscriptions to one key share one server subscription; a later
   * one gets the last known rows at once (asynchronously), every row as
   * added. Returns the function that ends this subscription (calling it
   * again does nothing).
   *
   * After a reconnect the key is subscribed again carrying the version of
   * the state held; when the server still has that state it answers
   * "unchanged" and no callback runs.
   *
   * A refused subscription (unknown_entity, forbidden, ...) ends, and its
   * onError (or the client's 'error' listeners) gets an EntitySyncError;
   * rate_limited is retried instead. A revoked one ends too, with onRevoked,
   * or onGone if there is no onRevoked. Ended subscriptions are not sent
   * again on reconnect.
   * @returns {() => void}
   */
  subscribe(entity, id, onRows, onGone) {
    if (typeof entity !== 'string' || entity === '' || typeof id !== 'string' || id === '') {
      throw new TypeError('entity-sync: subscribe needs a non-empty entity and id (strings)');
    }
    if (this.#closed) throw new Error('entity-sync: client closed');
    const handlers = typeof onRows === 'object' && onRows !== null ? { ...onRows } : { onRows, onGone };
    const handle = { handlers, active: true, cancelled: false };
    const k = keyString(entity, id);
    let sub = this.#subs.get(k);
    if (!sub) {
      // state: the key's KeyState (see applyFrame), null until the first.
      sub = { key: { entity, id }, handles: [handle], state: null };
      this.#subs.set(k, sub);
      const conn = this.#conn;
      // Or ends it (reported asynchronously) when the server's limit is reached.
      if (conn && conn.ready) this.#subscribeOn(conn, k, sub);
      return () => this.#unsubscribe(k, sub, handle);
    }
    if (sub.state !== null) {
      // This handle saw nothing yet: every row held is new to it.
      const state = sub.state;
      queueMicrotask(() => this.#deliver(handle, state, initialChanges(state)));
    }
    sub.handles.push(handle);
    return () => this.#unsubscribe(k, sub, handle);
  }

  /**
   * Sets the secret the server hands the application's lookup handlers for
   * this connection. Sent now if connected, and first on every reconnect.
   * @param {string} secret
   */
  setSecret(secret) {
    if (this.#closed) return;
    this.#secret = String(secret);
    const conn = this.#conn;
    if (conn && conn.ready) this.#send(conn, 'secret', this.#secret, {});
  }

  /**
   * Retries at once instead of waiting out the backoff: while disconnected
   * (a retry is scheduled), cancels the wait and opens a connection now, as
   * a page's "Retry now" button wants. Does nothing while connecting or
   * connected, or after close(). The backoff is not reset: if this attempt
   * fails too, the next delay is drawn as it would have been.
   */
  reconnect() {
    if (this.#closed || this.#retryTimer === null) return;
    clearTimeout(this.#retryTimer);
    this.#open();
  }

  /** Closes the connection (code 1000) and stops reconnecting. */
  close() {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#retryTimer !== null) clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    if (this.#onOnline) globalThis.removeEventListener('online', this.#onOnline);
    const conn = this.#conn;
    this.#conn = null;
    if (conn) {
      this.#release(conn);
      try {
        conn.ws.close(1000, 'client closed');
      } catch {
        // already closed
      }
    }
    this.#state = State.CLOSED;
    this.#emit('state', State.CLOSED, undefined);
  }

  // --- connection ---

  #open() {
    this.#retryTimer = null;
    if (this.#closed) return;
    this.#setState(State.CONNECTING);
    let ws;
    try {
      ws = new this.#WebSocket(this.#url, [SUBPROTOCOL]);
    } catch (error) {
      this.#lost(null, { error });
      return;
    }
    const conn = {
      ws,
      ready: false,
      nextRef: 0,
      pending: new Map(), // ref -> {action, key, sub}
      lastSeq: new Map(), // key -> seq last applied
      subscribing: new Map(), // key -> subscribes sent and not answered yet
      unsubs: new Map(), // key -> unacknowledged unsubscribes
      timers: new Set(),
      lastFrameAt: Date.now(),
      watchdog: null,
      queue: [], // requests not yet written, paced by pace
      inFlight: 0, // requests written and not answered yet
      pace: newPacer(0, 0),
      pumpTimer: null,
      maxSubs: Infinity, // the welcome's limits.maxSubscriptions
      // Keys held on the server: subscribes sent (or awaiting a rate-limited
      // retry) minus unsubscribes sent, refusals and revocations. Requests
      // are processed in order, so counting when one is queued matches.
      held: 0,
      welcomedAt: 0, // see #lost
    };
    this.#conn = conn;
    conn.handshake = setTimeout(() => {
      this.#lost(conn, { error: new EntitySyncError('timeout', 'entity-sync: no welcome within the handshake timeout') });
      try {
        ws.close();
      } catch {
        // nothing to do
      }
    }, this.#handshakeTimeout);
    ws.onopen = () => {
      if (ws.protocol !== SUBPROTOCOL) {
        this.#lost(conn, { error: new EntitySyncError('not_envelope', `entity-sync: server did not accept subprotocol ${SUBPROTOCOL}`) });
        ws.close(1000);
      }
    };
    ws.onmessage = (ev) => this.#onMessage(conn, ev.data);
    ws.onclose = (ev) => this.#lost(conn, { code: ev.code, reason: ev.reason });
    ws.onerror = () => {}; // a close event follows
  }

  #lost(conn, info) {
    if (conn !== null) {
      if (conn !== this.#conn) return;
      this.#release(conn);
      this.#conn = null;
      // The backoff starts afresh only after a connection that stayed open
      // healthyAfter since its welcome. Answers prove nothing: a server
      // that welcomes clients and acks their subscriptions can still drop
      // them at once (overloaded, refusing them, or a frame the client
      // cannot read), and must see them back off further each time, not
      // return at the first delay forever.
      if (conn.ready && Date.now() - conn.welcomedAt >= this.#healthyAfter) this.#attempt = 0;
    }
    if (this.#closed) return;
    const ceil = Math.min(this.#maxBackoff, this.#minBackoff * 2 ** Math.min(this.#attempt, 30));
    this.#attempt++;
    const retryIn = Math.round(Math.random() * ceil);
    // Scheduled before the listeners hear of it, so that one may call
    // reconnect() (or close()) at once.
    this.#retryTimer = setTimeout(() => this.#open(), retryIn);
    this.#setState(State.DISCONNECTED, { ...info, retryIn });
  }

  #release(conn) {
    clearTimeout(conn.handshake);
    clearTimeout(conn.watchdog);
    clearTimeout(conn.pumpTimer);
    conn.pumpTimer = null;
    conn.queue.length = 0;
    for (const t of conn.timers) clearTimeout(t);
    conn.timers.clear();
    conn.ws.onopen = conn.ws.onmessage = conn.ws.onclose = null;
    conn.ws.onerror = () => {};
  }

  #welcome(conn, f) {
    clearTimeout(conn.handshake);
    conn.ready = true;
    conn.welcomedAt = Date.now();
    this.#watch(conn, Number(f.heartbeatMs));
    const limits = f.limits && typeof f.limits === 'object' ? f.limits : {};
    const max = Number(limits.maxSubscriptions);
    if (max >= 1) conn.maxSubs = Math.floor(max);
    conn.pace = newPacer(Number(limits.messagesPerSecond), Number(limits.messageBurst));
    // Requests are processed in order: the secret applies to every
    // subscription that follows it.
    if (this.#secret !== '') this.#send(conn, 'secret', this.#secret, {});
    // A Map iterates in insertion order: oldest first, so when the server
    // allows fewer keys than the client holds, the newest are refused.
    for (const [k, sub] of [...this.#subs]) this.#subscribeOn(conn, k, sub);
    this.#setState(State.CONNECTED);
  }

  // #subscribeOn sends sub's subscribe on conn, unless the server's
  // maxSubscriptions would be exceeded: the subscription then ends with a
  // too_many_subscriptions error, as if the server had refused it, without
  // spending a request the server would refuse anyway.
  #subscribeOn(conn, k, sub) {
    if (conn.held >= conn.maxSubs) {
      const err = new EntitySyncError(
        'too_many_subscriptions',
        `entity-sync: not sent: the server allows ${conn.maxSubs} subscriptions per connection (limits.maxSubscriptions) and the client holds them all`,
        { action: 'subscribe', key: sub.key },
      );
      this.#end(k, sub);
      queueMicrotask(() => this.#fail(sub, err));
      return false;
    }
    conn.held++;
    this.#sendSubscribe(conn, sub);
    return true;
  }

  // #answered frees a place in the window of requests awaiting an answer.
  #answered(conn) {
    conn.inFlight--;
    if (conn.queue.length > 0) this.#pump(conn);
  }

  // #watch gives up on a connection that stays silent longer than the
  // server's heartbeat promises: browsers neither expose websocket pings nor
  // time out a read, so after a laptop sleep or a lost NAT entry a
  // half-open socket would otherwise stay "connected" on stale data for
  // as long as TCP takes to notice (often many minutes). A server that
  // announces no heartbeatMs (an older one) makes no promise: no timeout.
  // The timer checks the time of the last frame rather than being reset on
  // every frame, which would cost a timer per message; Date.now() also
  // moves on while the machine sleeps, so a check that fires late on wake-up
  // sees the whole silence.
  #watch(conn, heartbeatMs) {
    if (!(heartbeatMs > 0) || !Number.isFinite(heartbeatMs)) return;
    const limit = 2 * heartbeatMs + HEARTBEAT_SLACK;
    const check = () => {
      if (conn !== this.#conn) return;
      const silent = Date.now() - conn.lastFrameAt;
      if (silent < limit) {
        conn.watchdog = setTimeout(check, limit - silent);
        return;
      }
      this.#lost(conn, {
        error: new EntitySyncError(
          'timeout',
          `entity-sync: no frame for ${silent} ms although the server promised a heartbeat every ${heartbeatMs} ms: connection presumed dead`,
        ),
      });
      try {
        conn.ws.close();
      } catch {
        // nothing to do: the connection is already forgotten
      }
    };
    conn.watchdog = setTimeout(check, limit);
  }

  #send(conn, action, body, req) {
    const ref = String(++conn.nextRef);
    conn.pending.set(ref, { ...req, action });
    conn.queue.push(JSON.stringify({ action, body, ref }));
    this.#pump(conn);
  }

  // #pump writes queued requests in order, within the server's announced
  // token bucket (see newPacer) and with at most MAX_IN_FLIGHT awaiting an
  // answer; it comes back on a timer when the bucket is empty, and on the
  // next answer when the window is full.
  #pump(conn) {
    if (conn.pumpTimer !== null) return; // the timer will carry on
    while (conn.queue.length > 0 && conn.inFlight < MAX_IN_FLIGHT) {
      const wait = take(conn.pace, performance.now());
      if (wait > 0) {
        conn.pumpTimer = setTimeout(() => {
          conn.pumpTimer = null;
          if (conn === this.#conn) this.#pump(conn);
        }, wait);
        return;
      }
      const msg = conn.queue.shift();
      conn.inFlight++;
      try {
        conn.ws.send(msg);
      } catch {
        // the connection is going away; everything is sent again on reconnect
      }
    }
  }

  // #sendSubscribe sends sub's subscribe carrying the version of the state
  // held, so that the server can answer "unchanged" or with a diff instead
  // of every row; or, with full, carrying none: asking for the full state.
  #sendSubscribe(conn, sub, full = false) {
    const k = keyString(sub.key.entity, sub.key.id);
    conn.subscribing.set(k, (conn.subscribing.get(k) ?? 0) + 1);
    const version = full ? undefined : sub.state?.version;
    const body = version === undefined ? sub.key : { ...sub.key, version };
    this.#send(conn, 'subscribe', body, { key: sub.key, sub });
  }

  // #subscribeAnswered notes that a subscribe of key k got its ack or error.
  #subscribeAnswered(conn, k) {
    const n = (conn.subscribing.get(k) ?? 0) - 1;
    if (n > 0) conn.subscribing.set(k, n);
    else conn.subscribing.delete(k);
  }

  #sendUnsubscribe(conn, key) {
    const k = keyString(key.entity, key.id);
    conn.lastSeq.delete(k);
    conn.held--;
    conn.unsubs.set(k, (conn.unsubs.get(k) ?? 0) + 1);
    this.#send(conn, 'unsubscribe', key, { key });
  }

  #after(conn, ms, fn) {
    const t = setTimeout(() => {
      conn.timers.delete(t);
      if (conn === this.#conn && !this.#closed) fn();
    }, ms);
    conn.timers.add(t);
  }

  // --- frames ---

  #onMessage(conn, data) {
    if (conn !== this.#conn) return;
    conn.lastFrameAt = Date.now(); // any frame proves the connection alive
    let f;
    try {
      f = JSON.parse(typeof data === 'string' ? data : new TextDecoder().decode(data));
    } catch (error) {
      this.#emit('error', new EntitySyncError('bad_frame', `entity-sync: undecodable frame: ${error.message}`));
      return;
    }
    if (f === null || typeof f !== 'object') return;
    if (!conn.ready) {
      if (f.type === 'welcome') {
        this.#welcome(conn, f);
      } else {
        this.#lost(conn, { error: new EntitySyncError('bad_frame', `entity-sync: expected welcome, got ${String(f.type)}`) });
        conn.ws.close();
      }
      return;
    }
    switch (f.type) {
      case 'rows':
      case 'gone':
      case 'diff':
      case 'unchanged':
        if (f.key) this.#applyState(conn, f);
        break;
      case 'revoked':
        if (f.key) this.#revoke(conn, f.key, f.reason ?? '');
        break;
      case 'ack':
        this.#acked(conn, f.ref);
        break;
      case 'error':
        this.#refused(conn, f);
        break;
      case 'heartbeat':
        break; // its arrival, noted above, is all it says
      default:
      // a frame type from a newer server: ignored, as the protocol asks
    }
  }

  #applyState(conn, f) {
    const k = keyString(f.key.entity, f.key.id);
    const sub = this.#subs.get(k);
    if (!sub) return;
    const seq = Number(f.seq) || 0;
    if ((conn.unsubs.get(k) ?? 0) === 0) {
      const last = conn.lastSeq.get(k);
      if (last !== undefined && seq <= last) return; // older than what we have
    }
    const out = applyFrame(sub.state, f);
    switch (out.kind) {
      case 'invalid':
        this.#emit('error', new EntitySyncError('bad_frame', `entity-sync: ${out.problem}`, { key: sub.key }));
        return;
      case 'resync':
        if (out.problem) this.#emit('error', new EntitySyncError('bad_frame', `entity-sync: ${out.problem}; subscribing again`, { key: sub.key }));
        // A subscribe awaiting its answer brings a state anyway (the
        // frame may well be from before it); otherwise ask the server
        // again, from what we hold. The server holds the key already:
        // this is no new subscription to count.
        if (!conn.subscribing.has(k)) this.#sendSubscribe(conn, sub, out.version === undefined);
        return;
      case 'unchanged':
        conn.lastSeq.set(k, seq);
        return;
      default:
        conn.lastSeq.set(k, seq);
        sub.state = out.state;
        for (const h of [...sub.handles]) this.#deliver(h, out.state, out.changes);
    }
  }

  #revoke(conn, key, reason) {
    const k = keyString(key.entity, key.id);
    const sub = this.#subs.get(k);
    if (!sub) return;
    conn.held--; // the server removed it
    this.#end(k, sub);
    let removed = null; // what onGone reports: every row held, removed
    for (const h of sub.handles) {
      if (h.cancelled) continue;
      const { onRevoked, onGone } = h.handlers;
      if (onRevoked) {
        this.#call(onRevoked, reason);
      } else if (onGone) {
        removed ??= sub.state === null ? [] : applyFrame(sub.state, { type: 'gone' }).changes;
        this.#call(onGone, removed);
      }
    }
  }

  #acked(conn, ref) {
    const req = conn.pending.get(ref);
    if (!req) return;
    conn.pending.delete(ref);
    this.#answered(conn);
    if (req.action === 'subscribe') this.#subscribeAnswered(conn, keyString(req.key.entity, req.key.id));
    if (req.action === 'unsubscribe') this.#unsubDone(conn, req.key);
  }

  #unsubDone(conn, key) {
    const k = keyString(key.entity, key.id);
    const n = (conn.unsubs.get(k) ?? 0) - 1;
    if (n > 0) {
      conn.unsubs.set(k, n);
    } else {
      // No frame of the old server subscription can follow: a subscription
      // made since then numbers afresh.
      conn.unsubs.delete(k);
      conn.lastSeq.delete(k);
    }
  }

  #refused(conn, f) {
    const req = f.ref ? conn.pending.get(f.ref) : undefined;
    const err = new EntitySyncError(String(f.code ?? 'error'), String(f.message ?? ''), {
      action: req?.action,
      key: req?.key ?? f.key,
    });
    if (!req) {
      this.#emit('error', err);
      return;
    }
    conn.pending.delete(f.ref);
    this.#answered(conn);
    const limited = f.code === 'rate_limited';
    const retry = Math.random() * Math.min(this.#maxBackoff, this.#minBackoff * 4);
    if (req.action === 'subscribe') {
      const sub = req.sub;
      const k = keyString(sub.key.entity, sub.key.id);
      this.#subscribeAnswered(conn, k);
      if (this.#subs.get(k) !== sub) return; // unsubscribed meanwhile
      if (limited) {
        this.#emit('error', err);
        this.#after(conn, retry, () => {
          if (this.#subs.get(k) === sub) this.#sendSubscribe(conn, sub);
        });
        return;
      }
      conn.held--; // refused: the server does not hold it
      this.#end(k, sub);
      this.#fail(sub, err);
      return;
    }
    if (req.action === 'unsubscribe') {
      this.#unsubDone(conn, req.key);
      const k = keyString(req.key.entity, req.key.id);
      if (limited) {
        conn.held++; // the server still holds it until the retry
        this.#after(conn, retry, () => {
          if (!this.#subs.has(k)) this.#sendUnsubscribe(conn, req.key);
        });
      }
    } else if (req.action === 'secret' && limited) {
      this.#after(conn, retry, () => this.#send(conn, 'secret', this.#secret, {}));
    }
    this.#emit('error', err);
  }

  // --- subscriptions ---

  #unsubscribe(k, sub, handle) {
    handle.cancelled = true;
    if (!handle.active) return;
    handle.active = false;
    sub.handles = sub.handles.filter((h) => h !== handle);
    if (sub.handles.length > 0 || this.#subs.get(k) !== sub) return;
    this.#subs.delete(k);
    const conn = this.#conn;
    if (conn && conn.ready && !this.#closed) this.#sendUnsubscribe(conn, sub.key);
  }

  // #fail reports a refused subscription to its handles.
  #fail(sub, err) {
    for (const h of sub.handles) {
      if (h.cancelled) continue;
      if (h.handlers.onError) this.#call(h.handlers.onError, err);
      else this.#emit('error', err);
    }
  }

  #end(k, sub) {
    this.#subs.delete(k);
    this.#conn?.lastSeq.delete(k);
    for (const h of sub.handles) h.active = false;
  }

  #deliver(handle, state, changes) {
    if (!handle.active) return;
    const { onRows, onGone } = handle.handlers;
    if (state.gone) {
      if (onGone) this.#call(onGone, changes);
    } else if (onRows) {
      this.#call(onRows, state.rows, changes);
    }
  }

  // --- events ---

  #setState(state, info) {
    this.#state = state;
    this.#emit('state', state, info);
  }

  #emit(event, ...args) {
    const set = this.#listeners[event];
    if (event === 'error' && set.size === 0) {
      console.error(...args);
      return;
    }
    for (const fn of [...set]) this.#call(fn, ...args);
  }

  // #call runs application code; an exception it throws must not break the
  // client's bookkeeping, so it is reported instead.
  #call(fn, ...args) {
    try {
      fn(...args);
    } catch (error) {
      if (this.#listeners.error.size > 0 && !this.#listeners.error.has(fn)) this.#emit('error', error);
      else console.error('entity-sync: callback threw', error);
    }
  }
}

// --- key state: what the client holds for one key, and how frames change it ---
//
// applyFrame is the whole of the client's per-key logic for state frames
// (rows, gone, diff, unchanged), kept free of the connection so that it can
// be tested on its own and reused. It never changes the state it is given:
// the client keeps the old state until the new one is complete, so a frame
// that turns out to be invalid half-way leaves nothing half-applied.

/**
 * Applies one state frame (`rows`, `gone`, `diff` or `unchanged`, as parsed
 * from the wire) to the state the client holds for its key (null: nothing
 * yet). Returns one of:
 *
 * - `{kind: 'state', state, changes}`: the new state, and what changed
 *   since `state` (rows added, modified, removed, by id; empty for a key
 *   whose rows have no ids). Deliver it.
 * - `{kind: 'unchanged', state}`: the server confirmed the held state; keep
 *   it, deliver nothing.
 * - `{kind: 'resync', version, problem?}`: the frame cannot be applied to
 *   the held state (a diff from another base, an unchanged for another
 *   version, an invalid diff). Apply nothing; subscribe to the key again,
 *   carrying `version` (undefined: ask for the full state). `problem` says
 *   what was wrong with an invalid frame.
 * - `{kind: 'invalid', problem}`: a malformed full state; drop it.
 *
 * @param {KeyState|null} state
 * @param {object} frame
 */
export function applyFrame(state, frame) {
  switch (frame?.type) {
    case 'rows':
      return applyRows(state, frame);
    case 'gone':
      return applyGone(state, frame);
    case 'diff':
      return applyDiff(state, frame);
    case 'unchanged':
      if (state === null || state.version === undefined || frame.version !== state.version) {
        return { kind: 'resync', version: state?.version };
      }
      return { kind: 'unchanged', state };
    default:
      throw new TypeError(`entity-sync: applyFrame: ${String(frame?.type)} is not a state frame`);
  }
}

/**
 * The changes that make up `state` for someone who held nothing: every row
 * added (empty for a key without row ids, or gone).
 * @param {KeyState} state
 */
export function initialChanges(state) {
  return compareByID(null, state);
}

const NO_ENTRIES = new Map();

const versionOf = (f) => (typeof f.version === 'string' ? f.version : undefined);

// A key's state. ids and entries are null for a key whose rows carry no ids
// (not a collection): its rows are only ever replaced whole. For a
// collection, ids lists the row ids in server order and entries maps each
// id to its row and the row's JSON text (what "same row" means when
// computing changes). rows is what the application gets; it may change that
// array, so the state never reads it back.
function keyState(gone, version, rows, ids, entries) {
  return Object.freeze({ gone, version, rows, ids, entries });
}

function applyRows(prev, f) {
  const rows = Array.isArray(f.rows) ? f.rows : [];
  const version = versionOf(f);
  if (f.ids === undefined || f.ids === null) {
    return { kind: 'state', state: keyState(false, version, rows, null, null), changes: [] };
  }
  if (!Array.isArray(f.ids) || f.ids.length !== rows.length) {
    return { kind: 'invalid', problem: `rows frame: ids must be an array parallel to rows (${rows.length} rows)` };
  }
  const entries = new Map();
  for (let i = 0; i < rows.length; i++) {
    const id = f.ids[i];
    if (typeof id !== 'string') return { kind: 'invalid', problem: `rows frame: ids[${i}] is not a string` };
    if (entries.has(id)) return { kind: 'invalid', problem: `rows frame: id ${JSON.stringify(id)} appears twice` };
    entries.set(id, { row: rows[i], json: JSON.stringify(rows[i]) });
  }
  // A collection with no rows is gone, however it arrives.
  const next = keyState(rows.length === 0, version, rows, f.ids.slice(), entries);
  return { kind: 'state', state: next, changes: compareByID(prev, next) };
}

function applyGone(prev, f) {
  const next = keyState(true, versionOf(f), [], [], NO_ENTRIES);
  return { kind: 'state', state: next, changes: compareByID(prev, next) };
}

function applyDiff(prev, f) {
  if (prev === null || prev.version === undefined || f.base !== prev.version) {
    // Not the state the server diffed from: ask again from what we hold.
    return { kind: 'resync', version: prev?.version };
  }
  const bad = (problem) => ({ kind: 'resync', version: undefined, problem: `diff frame: ${problem}` });
  if (prev.entries === null) return bad('the key is held without row ids');
  const remove = f.remove ?? [];
  const upsert = f.upsert ?? [];
  if (f.version === prev.version && remove.length === 0 && upsert.length === 0 && f.order === undefined) {
    // The key came back to the rows held (after states this connection
    // skipped): nothing to apply and, as for unchanged, nothing to report.
    return { kind: 'unchanged', state: prev };
  }
  if (!Array.isArray(remove) || !remove.every((id) => typeof id === 'string')) return bad('remove must be an array of ids');
  if (!Array.isArray(upsert)) return bad('upsert must be an array');
  for (const u of upsert) {
    if (u === null || typeof u !== 'object' || typeof u.id !== 'string' || !('row' in u)) {
      return bad('each upsert entry needs a string id and a row');
    }
  }
  const before = prev.entries;
  const entries = new Map(before);
  let removed = 0;
  for (const id of remove) if (entries.delete(id)) removed++;
  let ids = removed > 0 ? prev.ids.filter((id) => entries.has(id)) : prev.ids.slice();
  for (const u of upsert) {
    if (!entries.has(u.id)) ids.push(u.id);
    entries.set(u.id, { row: u.row, json: JSON.stringify(u.row) });
  }
  if (f.order !== undefined && f.order !== null) {
    const order = f.order;
    if (!Array.isArray(order) || order.length !== ids.length) return bad(`order must list the ${ids.length} ids held after the diff`);
    const seen = new Set();
    for (const id of order) {
      if (!entries.has(id) || seen.has(id)) return bad(`order names ${JSON.stringify(id)}, which is not held or appears twice`);
      seen.add(id);
    }
    ids = order.slice();
  }
  const rows = ids.map((id) => entries.get(id).row);
  const next = keyState(ids.length === 0, versionOf(f), rows, ids, entries);

  // Only the ids the diff names can have changed. Listed as compareByID
  // lists them, so that the application sees the same changes whether the
  // server sent a diff or the full rows.
  const changes = [];
  if (removed > 0) {
    for (const id of prev.ids) {
      if (!entries.has(id)) changes.push({ type: 'removed', id, row: before.get(id).row });
    }
  }
  if (upsert.length > 0) {
    const upserted = new Set(upsert.map((u) => u.id));
    for (const id of ids) {
      if (!upserted.has(id)) continue;
      const old = before.get(id);
      const now = entries.get(id);
      // A row removed and upserted again by one diff is held still: only a
      // changed value counts.
      if (!old) changes.push({ type: 'added', id, row: now.row });
      else if (old.json !== now.json) changes.push({ type: 'modified', id, row: now.row });
    }
  }
  return { kind: 'state', state: next, changes };
}

// compareByID lists what changed from prev to next, matching rows by id:
// removed rows (with their old row) in their old order, then added and
// modified rows in their new order. Keys without row ids have no changes.
function compareByID(prev, next) {
  if (next.entries === null) return [];
  const before = prev?.entries ?? NO_ENTRIES;
  const changes = [];
  if (before.size > 0) {
    for (const id of prev.ids) {
      if (!next.entries.has(id)) changes.push({ type: 'removed', id, row: before.get(id).row });
    }
  }
  for (const id of next.ids) {
    const now = next.entries.get(id);
    const old = before.get(id);
    if (!old) changes.push({ type: 'added', id, row: now.row });
    else if (old.json !== now.json) changes.push({ type: 'modified', id, row: now.row });
  }
  return changes;
}

// newPacer makes the token bucket a connection's requests go through, from
// the welcome's limits.messagesPerSecond and messageBurst, so that a client
// resubscribing many keys sends a burst and then a steady stream instead of
// a flood the server refuses with rate_limited (and, if it goes on, closes
// with 1008). The server's bucket is full when the welcome arrives, as is
// this one. One token is kept in reserve and the refill runs at 90% of the
// announced rate: requests can reach the server closer together than they
// were sent, and the margin absorbs that. No rate announced (an older
// server): no pacing.
function newPacer(rate, burst) {
  if (!(rate > 0) || !Number.isFinite(rate)) return { rate: 0 };
  if (!(burst >= 1) || !Number.isFinite(burst)) burst = 1; // a rate without a burst: one at a time
  const capacity = Math.max(1, Math.floor(burst) - 1);
  return { rate: 0.9 * rate, capacity, tokens: capacity, last: performance.now() };
}

// take takes a token from the pacer and returns 0, or returns how many ms
// until one is available.
function take(p, now) {
  if (p.rate === 0) return 0;
  p.tokens = Math.min(p.capacity, p.tokens + ((now - p.last) / 1000) * p.rate);
  p.last = now;
  if (p.tokens >= 1) {
    p.tokens--;
    return 0;
  }
  return Math.ceil(((1 - p.tokens) / p.rate) * 1000);
}

function positive(v, dflt) {
  return typeof v === 'number' && v > 0 && Number.isFinite(v) ? v : dflt;
}

function resolveURL(url) {
  const base = globalThis.location?.href;
  const u = base ? new URL(url, base) : new URL(url);
  if (u.protocol === 'http:') u.protocol = 'ws:';
  else if (u.protocol === 'https:') u.protocol = 'wss:';
  if (u.protocol !== 'ws:' && u.protocol !== 'wss:') {
    throw new TypeError(`entity-sync: URL ${url} must be ws:, wss:, http: or https:`);
  }
  return u.toString();
}
