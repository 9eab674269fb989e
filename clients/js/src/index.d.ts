// Types of @pgrelay/client (the JavaScript is in the .js files beside this).

export type ConnectionState = "connecting" | "connected" | "disconnected" | "closed";

export interface TokenRequest {
  reason: "connect" | "refresh" | "refused";
  /** The token the relay refused, when reason is "refused". */
  refused: string | null;
}
export type TokenProvider = string | ((request: TokenRequest) => string | Promise<string>);

export interface Bounds {
  min: number;
  max: number;
}

/** An event frame: one committed change of a tracked row. */
export interface EventFrame<Row = any> {
  type: "cache_invalidate";
  resource: string;
  action: "INSERT" | "UPDATE" | "DELETE";
  id: string;
  project_id: string;
  seq: number;
  timestamp: string;
  /** The row after the change; for a DELETE, the row as it was. */
  data: Row;
  [field: string]: unknown;
}

export interface ResetInfo {
  /** "history_trimmed", "history_diverged", "seq_ahead", or a reason this SDK does not know yet (a reset all the same). */
  reason: string;
  seq: number;
  frame: object;
}

/** A broadcast of the project: `from` is the sender's user id (stamped by the relay), null when sent from SQL. */
export interface BroadcastFrame<Payload = any> {
  type: "broadcast";
  project_id: string;
  event: string;
  from: string | null;
  payload: Payload;
}

export interface BroadcastOptions {
  /** Also deliver it to this connection (default false). */
  self?: boolean;
  /** Return a promise of the relay's acknowledgement (default false: fire and forget). */
  ack?: boolean;
  /** ms to wait for the acknowledgement (default 10,000). */
  timeout?: number;
}

/** One connection of a present user, with the state it joined with. */
export interface PresenceConnection<State = any> {
  connection: string;
  state: State;
}

export interface PresenceChange<State = any> {
  user: string;
  /** The user's connections now (empty on leave). */
  connections: PresenceConnection<State>[];
}

/** Opaque and JSON-serialisable: store `subscription.cursor`, pass it back as `{cursor}`. */
export type Cursor = object;

export interface SubscribeOptions {
  /** A stored `subscription.cursor` to resume from (a position in the project's whole stream: valid with any filter). */
  cursor?: Cursor | null;
  /** Watch the project's presence from the first subscribe. */
  presence?: boolean;
  /** Only these resources' events (1 to 32 names, as `relay.enable` names them); omitted: every resource. */
  resources?: string[];
}

/** What `subscribed` says: the relay's latest seq; the filter, and those of its resources no table is tracked as. */
export interface SubscribedInfo {
  seq: number;
  resources: string[] | null;
  untracked: string[];
}

/** The cursor moved from `after` to `seq` past events the filter leaves out. */
export interface SkippedInfo {
  after: number;
  seq: number;
}

type Off = () => void;

export class TokenSource {
  constructor(provider: TokenProvider);
  get(minValidMs?: number): Promise<string>;
  fresh(reason: TokenRequest["reason"], refused: string | null): Promise<string>;
}
export function expiresAt(token: string): number | null;

export interface ClientOptions {
  url?: string;
  token: TokenProvider | TokenSource;
  WebSocket?: unknown;
  backoff?: Partial<Bounds>;
  slowBackoff?: Partial<Bounds>;
  pingInterval?: number;
  pingTimeout?: number;
  connectTimeout?: number;
  refreshBefore?: number;
  autoConnect?: boolean;
}

export class Client {
  constructor(options: ClientOptions);
  readonly url: string;
  readonly tokens: TokenSource;
  readonly state: ConnectionState;
  readonly subscriptions: Map<string, Subscription>;
  readonly stats: { sockets: number; reconnects: number; lastClose: { code: number; reason: string } | null };
  connect(): void;
  close(): void;
  subscribe(project: string | number, options?: SubscribeOptions): Subscription;
  on(event: "state", fn: (state: ConnectionState) => void): Off;
  on(event: "error", fn: (error: PgRelayError) => void): Off;
  on(event: "reconnecting", fn: (info: { delay: number; attempt: number; code: number | null }) => void): Off;
  on(event: "authenticated", fn: (info: { expiresAt: number }) => void): Off;
  off(event: string, fn: Function): void;
}

export class Subscription {
  readonly client: Client;
  readonly project: string;
  readonly state: "pending" | "subscribed" | "ended";
  readonly cursor: Cursor | null;
  readonly ended: boolean;
  /** The resources asked for; null: every resource. */
  readonly resources: string[] | null;
  /** Of `resources`, those no table was tracked as at the last `subscribed`. */
  readonly untracked: string[];
  readonly stats: { delivered: number; duplicates: number; heldBack: number; gapsRefilled: number; resets: number; skipped: number };
  readonly presence: Presence;
  ready(): Promise<void>;
  unsubscribe(): void;
  broadcast(event: string, payload?: unknown, options?: BroadcastOptions & { ack?: false }): boolean;
  broadcast(event: string, payload: unknown, options: BroadcastOptions & { ack: true }): Promise<void>;
  on(event: "event", fn: (event: EventFrame) => void): Off;
  on(event: "reset", fn: (info: ResetInfo) => void): Off;
  on(event: "subscribed", fn: (info: SubscribedInfo) => void): Off;
  on(event: "skipped", fn: (info: SkippedInfo) => void): Off;
  on(event: "broadcast", fn: (broadcast: BroadcastFrame) => void): Off;
  on(event: "error", fn: (error: SubscriptionError | SignalError) => void): Off;
  on(event: "ended", fn: (error: SubscriptionError | null) => void): Off;
  off(event: string, fn: Function): void;
}

export class Presence<State = any> {
  readonly subscription: Subscription;
  /** user id -> that user's connections (several tabs: several connections). */
  readonly members: Map<string, PresenceConnection<State>[]>;
  readonly truncated: boolean;
  readonly connection: string | null;
  readonly state: State | null;
  readonly joined: boolean;
  join(state?: State): void;
  update(state: State): void;
  leave(): void;
  on(event: "join" | "update" | "leave", fn: (change: PresenceChange<State>) => void): Off;
  on(event: "sync", fn: (info: { members: Map<string, PresenceConnection<State>[]>; truncated: boolean }) => void): Off;
  on(event: "change", fn: (members: Map<string, PresenceConnection<State>[]>) => void): Off;
  off(event: string, fn: Function): void;
}

export interface CollectionOptions<Row> {
  load: () => Promise<Row[]>;
  key?: (row: Row) => string;
  version?: (row: Row) => number | undefined;
  isDeleted?: (row: Row) => boolean;
  sort?: (a: Row, b: Row) => number;
}

export interface CollectionChange<Row> {
  reason: "load" | "event" | "upsert";
  changes: { type: "upsert" | "remove"; key: string; row: Row }[];
}

export class Collection<Row = any> {
  constructor(subscription: Subscription, resource: string, options: CollectionOptions<Row>);
  readonly subscription: Subscription;
  readonly resource: string;
  readonly loading: boolean;
  readonly ready: Promise<void>;
  readonly size: number;
  get(key: string): Row | undefined;
  values(): Row[];
  upsert(row: Row): void;
  reload(): Promise<void>;
  stop(): void;
  on(event: "change", fn: (change: CollectionChange<Row>) => void): Off;
  on(event: "reset", fn: (info: ResetInfo) => void): Off;
  on(event: "error", fn: (error: unknown) => void): Off;
  off(event: string, fn: Function): void;
}

export function collection<Row = any>(client: Client, project: string, resource: string, options: CollectionOptions<Row>): Collection<Row>;

export interface Message {
  id: string;
  project_id: string;
  seq: number;
  sender_id: string;
  body: string;
  client_generated_id: string;
  status: "sent" | "delivered" | "read";
  version: number;
  created_at: string;
  edited_at: string | null;
  deleted_at: string | null;
}

export class ChatApi {
  constructor(options: { client?: Client; baseUrl?: string; token?: TokenProvider | TokenSource; fetch?: typeof fetch });
  readonly baseUrl: string;
  projects(): Promise<{ id: string; name: string; role: string; latest_seq: number; created_at: string }[]>;
  messages(project: string, page?: { beforeSeq?: number; limit?: number }): Promise<{ messages: Message[]; has_more: boolean; next_before_seq: number | null }>;
  recentMessages(project: string, limit?: number): Promise<Message[]>;
  send(project: string, body: string, clientGeneratedId: string): Promise<{ message: Message; created: boolean }>;
  edit(messageId: string, body: string, version: number): Promise<{ message: Message }>;
  delete(messageId: string, version?: number): Promise<{ message: Message }>;
  markDelivered(project: string, upToSeq: number): Promise<{ project_id: string; changed: number }>;
  markRead(project: string, upToSeq: number): Promise<{ project_id: string; changed: number }>;
  unread(project: string): Promise<number>;
  request(method: string, path: string, body?: unknown): Promise<any>;
}

export interface OutboxItem {
  id: string;
  op: "send" | "edit" | "delete";
  project?: string;
  body?: string;
  messageId?: string;
  version?: number;
  status: "pending" | "sent" | "failed";
  attempts: number;
  error: { status: number; code: string; message: string } | null;
  message: Message | null;
  createdAt: number;
}

export interface Storage {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
}

export class Outbox {
  constructor(options: { api: ChatApi; client?: Client; storage?: Storage | null; storageKey?: string; maxAttempts?: number; backoff?: Partial<Bounds> });
  readonly items: OutboxItem[];
  send(project: string, body: string): OutboxItem;
  edit(message: Message, body: string): OutboxItem;
  delete(message: Message): OutboxItem;
  pending(project?: string): OutboxItem[];
  retry(id: string): void;
  discard(id: string): void;
  stop(): void;
  on(event: "change", fn: (item: OutboxItem) => void): Off;
  off(event: string, fn: Function): void;
}
export function unsent(items: OutboxItem[], rows: Iterable<{ client_generated_id?: string }>): OutboxItem[];

export function invalidateOn(subscription: Subscription, handlers: Record<string, (event: EventFrame | null) => void>): Off;

export const Close: Readonly<Record<string, number>>;
export const ErrorCode: Readonly<Record<string, string>>;
export const ResetReason: Readonly<Record<string, string>>;
export function closeAction(code: number): "reconnect" | "slow" | "token" | "fatal";
export function backoffDelay(attempt: number, bounds: Bounds, random?: () => number): number;
export const DEFAULT_BACKOFF: Readonly<Bounds>;
export const SLOW_BACKOFF: Readonly<Bounds>;
export function isRetryableStatus(status: number): boolean;

export class PgRelayError extends Error {
  code: number | string | null;
  fatal: boolean;
}
export class AuthError extends PgRelayError {}
export class ConnectionError extends PgRelayError {}
export class SubscriptionError extends PgRelayError {
  project: string | null;
}
export class SignalError extends PgRelayError {
  project: string | null;
  action: string | null;
  id: string | null;
}
export class ApiError extends PgRelayError {
  status: number;
  field: string | null;
  retryAfterMs: number | null;
  retryable: boolean;
}
