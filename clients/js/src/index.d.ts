// Types of @entity-sync/client (src/index.js).

/** The websocket subprotocol the client offers and requires. */
export const SUBPROTOCOL: 'entitysync.v1';

/** Where entity-sync servers serve their websocket endpoint by default. */
export const PATH: '/ws/entity-sync/';

/** Connection states. */
export declare const State: {
  readonly CONNECTING: 'connecting';
  readonly CONNECTED: 'connected';
  readonly DISCONNECTED: 'disconnected';
  readonly CLOSED: 'closed';
};
export type ConnectionState = (typeof State)[keyof typeof State];

/** An entity key: the entity type and the id. */
export interface EntityKey {
  entity: string;
  id: string;
}

/** Error codes of the envelope protocol, plus the client's own. */
export type ErrorCode =
  | 'bad_request'
  | 'unknown_action'
  | 'invalid_key'
  | 'unknown_entity'
  | 'forbidden'
  | 'too_many_subscriptions'
  | 'rate_limited'
  | 'internal'
  | 'timeout'
  | 'not_envelope'
  | 'bad_frame'
  | (string & {});

/** A request the server refused, or a client-side protocol failure. */
export declare class EntitySyncError extends Error {
  constructor(code: string, message: string, about?: { action?: string; key?: EntityKey });
  readonly name: 'EntitySyncError';
  /** e.g. 'forbidden', 'unknown_entity', 'rate_limited'. */
  readonly code: ErrorCode;
  /** The refused request's action ('subscribe', 'unsubscribe', 'secret'), if known. */
  readonly action?: string;
  /** The key the request was about, if any. */
  readonly key?: EntityKey;
}

/** What 'state' listeners get besides the state. */
export interface StateInfo {
  /** Close code, when the connection closed. */
  code?: number;
  /** Close reason, when the connection closed. */
  reason?: string;
  /** Why the attempt failed, when it did before the connection opened. */
  error?: unknown;
  /**
   * Milliseconds until the next attempt (state 'disconnected' only), for a
   * "retrying in N s" display; client.reconnect() retries at once.
   */
  retryIn?: number;
}

export interface ClientOptions {
  /** WebSocket constructor. Default: globalThis.WebSocket (browsers, Node.js 22+). */
  WebSocket?: new (url: string, protocols?: string | string[]) => WebSocket | any;
  /** Secret sent first on every connection. */
  secret?: string;
  /**
   * Ceiling of the first reconnect delay in ms (default 500); doubles per failed attempt,
   * and starts afresh only after a connection that stayed healthy (see healthyAfter).
   */
  minBackoff?: number;
  /** Largest reconnect delay ceiling in ms (default 20000). Delays are uniform in [0, ceiling). */
  maxBackoff?: number;
  /**
   * Milliseconds a connection must stay open after the server's welcome for the reconnect
   * backoff to start afresh when it ends (default 5000). Acks do not count: a connection
   * that ends sooner, however much the server answered, makes the next delay's ceiling grow.
   */
  healthyAfter?: number;
  /** Milliseconds to open the websocket and receive the welcome (default 10000). */
  handshakeTimeout?: number;
  /** Same as client.on('state', fn). */
  onStateChange?: (state: ConnectionState, info?: StateInfo) => void;
  /** Same as client.on('error', fn). */
  onError?: (err: unknown) => void;
}

/** The rows of one change: each row as the server's fetch function made it, parsed. */
export type Rows<Row = unknown> = Row[];

/**
 * One row's change in a collection key (a key whose rows the server names by id), since
 * the previous state the subscription was handed; like Firestore's docChanges.
 */
export interface RowChange<Row = unknown> {
  type: 'added' | 'modified' | 'removed';
  /** The row's id, as the server names it. */
  id: string;
  /** The row now; for 'removed', the row as it was last. */
  row: Row;
}

/**
 * What changed, row by row: removed rows first (in their old order), then added and
 * modified rows in their new order. Rows are compared by JSON.stringify of the parsed
 * row. Empty for a key whose rows have no ids (not a collection), and for a state that
 * only reorders rows.
 */
export type RowChanges<Row = unknown> = RowChange<Row>[];

export interface SubscriptionHandlers<Row = unknown> {
  /**
   * The key's rows: now, and after every change. For a collection key, changes says
   * which rows were added, modified or removed since the previous call (on the first
   * call: every row added). Not called when a resubscription finds the state unchanged.
   */
  onRows?: (rows: Rows<Row>, changes: RowChanges<Row>) => void;
  /**
   * The key has no rows (deleted / does not exist; for a collection: empty). The
   * subscription stays. For a collection that had rows, changes lists them as removed.
   */
  onGone?: (changes: RowChanges<Row>) => void;
  /** The server withdrew access; the subscription has ended. Default: onGone. */
  onRevoked?: (reason: string) => void;
  /**
   * The server refused the subscription, or the client did not send it because the
   * connection holds the server's announced maxSubscriptions (code
   * 'too_many_subscriptions'); it has ended. Default: the client's 'error' listeners.
   */
  onError?: (err: EntitySyncError) => void;
}

export declare class EntitySyncClient {
  constructor(url: string, options?: ClientOptions);
  /** The current connection state. */
  readonly state: ConnectionState;
  /** Adds a listener; returns the function that removes it. */
  on(event: 'state', fn: (state: ConnectionState, info?: StateInfo) => void): () => void;
  on(event: 'error', fn: (err: unknown) => void): () => void;
  /**
   * Subscribes to (entity, id). Returns the function that ends this
   * subscription. Throws a TypeError for an empty entity or id, an Error on a
   * closed client.
   */
  subscribe<Row = unknown>(
    entity: string,
    id: string,
    onRows: (rows: Rows<Row>, changes: RowChanges<Row>) => void,
    onGone?: (changes: RowChanges<Row>) => void,
  ): () => void;
  subscribe<Row = unknown>(entity: string, id: string, handlers: SubscriptionHandlers<Row>): () => void;
  /** Sets the connection's secret; sent now if connected and on every reconnect. */
  setSecret(secret: string): void;
  /**
   * While disconnected, cancels the wait for the next attempt and connects now. Does
   * nothing while connecting or connected, or after close(). Does not reset the backoff.
   */
  reconnect(): void;
  /** Closes the connection (code 1000) and stops reconnecting. */
  close(): void;
}

/** Opens a client that connects in the background and reconnects until close(). */
export declare function connect(url: string, options?: ClientOptions): EntitySyncClient;

/**
 * The state the client holds for one key (see applyFrame). Never changed in place; rows is
 * the array handed to the application, which may change it freely: the state does not read
 * it back.
 */
export interface KeyState<Row = unknown> {
  /** The key has no rows. */
  readonly gone: boolean;
  /** The version of the state (16 hex digits), echoed when subscribing again. */
  readonly version: string | undefined;
  readonly rows: Rows<Row>;
  /** The rows' ids in server order, parallel to rows; null for a key without row ids. */
  readonly ids: readonly string[] | null;
  /** Row and JSON text by id; null for a key without row ids. */
  readonly entries: ReadonlyMap<string, { row: Row; json: string }> | null;
}

/** A state frame of the envelope protocol, as parsed from the wire. */
export interface StateFrame {
  type: 'rows' | 'gone' | 'diff' | 'unchanged';
  key?: EntityKey;
  seq?: number;
  version?: string;
  /** rows: the rows' ids, for a collection key. */
  ids?: string[];
  rows?: unknown[];
  /** diff: the version the diff applies to. */
  base?: string;
  upsert?: { id: string; row: unknown }[];
  remove?: string[];
  order?: string[];
}

/** What applyFrame makes of a frame. */
export type ApplyResult<Row = unknown> =
  /** A new state and the changes to hand the application. */
  | { kind: 'state'; state: KeyState<Row>; changes: RowChanges<Row> }
  /** The server confirmed the state held: keep it, hand nothing. */
  | { kind: 'unchanged'; state: KeyState<Row> }
  /**
   * Not applicable to the state held: apply nothing, subscribe again carrying version
   * (undefined: ask for the full state). problem is set when the frame was invalid.
   */
  | { kind: 'resync'; version: string | undefined; problem?: string }
  /** A malformed full state: drop it. */
  | { kind: 'invalid'; problem: string };

/**
 * The client's per-key logic, exported for tests and other transports: applies a state
 * frame to the state held for its key (null: nothing yet). Pure: never changes state.
 * Throws a TypeError for a frame that is not a state frame.
 */
export declare function applyFrame<Row = unknown>(state: KeyState<Row> | null, frame: StateFrame): ApplyResult<Row>;

/** Every row of state as added: what a subscription that held nothing is handed. */
export declare function initialChanges<Row = unknown>(state: KeyState<Row>): RowChanges<Row>;
