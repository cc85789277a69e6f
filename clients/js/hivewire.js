// hivewire's browser client: docs/WIRE.md over a WebSocket, as an ES module.
//
//   import { connect } from "./hivewire.js";
//   const hw = await connect("ws://127.0.0.1:7000/", { agentId: "tab-1", token: "…" });
//   const answer = await hw.request("hub", "echo", { n: 42 }, { timeoutMs: 5000 });
//   const sub = await hw.subscribe("sensors.*.temperature", (value, msg) => console.log(msg.topic, value));
//   hw.publish("ui.clicks", { x: 1 });
//   hw.onRequest = async (method, value, msg) => ({ ok: true });  // answer requests to this agent
//   hw.close();
//
// Payloads are MessagePack (structs as maps), through @msgpack/msgpack. Compression is not
// offered, so the hub never compresses frames to this client.

import { encode, decode } from "@msgpack/msgpack";

export const SUBPROTOCOL = "hivewire.v1";
export const PROTOCOL_VERSION = [1, 0];
const MAGIC0 = 0x48; // "H"
const MAGIC1 = 0x57; // "W"
const FRAME_VERSION = 1;
const HEADER_LEN = 8;
const DEFAULT_TTL = 8;
const PRIORITY_NORMAL = 128;
const PRIORITY_CONTROL = 255;

/** A failure reported by the hub or the peer: `code` is the protocol's error code. */
export class HivewireError extends Error {
  constructor(message, code) {
    super(message);
    this.name = "HivewireError";
    this.code = code;
  }
}

/** Topic matching as the hub does it: `*` is one segment, a trailing `**` one or more. */
export function topicMatches(pattern, topic) {
  const p = pattern.split(".");
  const t = topic.split(".");
  for (let i = 0; i < p.length; i++) {
    if (p[i] === "**" && i === p.length - 1) return t.length > i;
    if (i >= t.length) return false;
    if (p[i] !== "*" && p[i] !== t[i]) return false;
  }
  return p.length === t.length;
}

/** One frame around an encoded envelope (no compression). */
export function frame(body) {
  const out = new Uint8Array(HEADER_LEN + body.length);
  out[0] = MAGIC0;
  out[1] = MAGIC1;
  out[2] = FRAME_VERSION;
  out[3] = 0;
  new DataView(out.buffer).setUint32(4, body.length, false);
  out.set(body, HEADER_LEN);
  return out;
}

/** Splits one WebSocket binary message into the envelopes of its frames (one or more). */
export function unframe(bytes, maxBody) {
  const envelopes = [];
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let at = 0;
  while (at < bytes.length) {
    if (bytes.length - at < HEADER_LEN) throw new HivewireError("truncated frame header");
    if (bytes[at] !== MAGIC0 || bytes[at + 1] !== MAGIC1) throw new HivewireError("bad frame magic");
    if (bytes[at + 2] !== FRAME_VERSION) throw new HivewireError(`frame version ${bytes[at + 2]}`);
    if (bytes[at + 3] !== 0) throw new HivewireError("compressed or flagged frame, not negotiated");
    const len = view.getUint32(at + 4, false);
    if (len > maxBody) throw new HivewireError(`frame of ${len} bytes over the limit`);
    if (bytes.length - at - HEADER_LEN < len) throw new HivewireError("message ends inside a frame");
    envelopes.push(bytes.subarray(at + HEADER_LEN, at + HEADER_LEN + len));
    at += HEADER_LEN + len;
  }
  return envelopes;
}

/** The 11-element envelope of docs/WIRE.md §2, as an object. */
function toEnvelope(m) {
  return [
    m.id,
    m.correlationId ?? null,
    m.source,
    m.destination ?? null,
    m.kind,
    m.headers ?? {},
    m.priority ?? PRIORITY_NORMAL,
    m.ttl ?? DEFAULT_TTL,
    m.timestampMs ?? Date.now(),
    0,
    m.payload ?? new Uint8Array(0),
  ];
}

function fromEnvelope(a) {
  if (!Array.isArray(a) || a.length !== 11) throw new HivewireError("envelope is not an array of 11");
  const [id, correlationId, source, destination, kind, headers, priority, ttl, timestampMs, sequence, payload] = a;
  const m = { id, correlationId, source, destination, kind, headers, priority, ttl, timestampMs, sequence, payload };
  // Kind: a unit variant is a string, others a one-entry map {name: fields}.
  if (typeof kind === "string") {
    m.kindName = kind;
  } else if (kind && typeof kind === "object") {
    const [name] = Object.keys(kind);
    m.kindName = name;
    m.fields = kind[name];
  } else {
    throw new HivewireError("bad kind");
  }
  if (m.kindName === "Event" || m.kindName === "Broadcast") m.topic = m.fields[0];
  if (m.kindName === "Request") m.method = m.fields[0];
  return m;
}

/** Connects and completes the handshake; resolves to a {@link Client}. */
export async function connect(url, options = {}) {
  const client = new Client(url, options);
  await client._open();
  return client;
}

export class Client {
  constructor(url, options) {
    this.url = url;
    this.agentId = options.agentId ?? `browser-${Math.random().toString(16).slice(2, 10)}`;
    this.metadata = options.metadata ?? {};
    this.timeoutMs = options.timeoutMs ?? 10000;
    this.heartbeatMs = options.heartbeatMs ?? 5000;
    this.maxBody = (options.maxMessageSize ?? 16 * 1024 * 1024) + 65536;
    this.token = options.token;
    this.hubId = null;
    this.nextId = 1;
    this.pending = new Map(); // request id -> {resolve, reject, timer}
    this.subscriptions = new Map(); // pattern -> Set of handlers
    this.onRequest = null; // async (method, value, msg) => reply value
    this.onEvent = null; // (topic, value, msg) => void, for events addressed to this agent
    this.onClose = null;
    this.closed = false;
    this.lastHeard = Date.now();
  }

  _open() {
    let url = this.url;
    if (this.token) url += (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(this.token);
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url, [SUBPROTOCOL]);
      ws.binaryType = "arraybuffer";
      this.ws = ws;
      const timer = setTimeout(() => {
        reject(new HivewireError(`no handshake within ${this.timeoutMs} ms`));
        ws.close();
      }, this.timeoutMs);
      this._handshake = { resolve, reject, timer };
      ws.onopen = () => {
        if (ws.protocol !== SUBPROTOCOL) {
          this._fail(new HivewireError(`server chose subprotocol "${ws.protocol}"`));
          return;
        }
        this._send({
          kind: { Control: { Hello: [PROTOCOL_VERSION, ["pubsub"], this.metadata] } },
          priority: PRIORITY_CONTROL,
        });
      };
      ws.onmessage = (ev) => this._onMessage(ev.data);
      ws.onerror = () => this._fail(new HivewireError(`WebSocket error on ${this.url}`));
      ws.onclose = (ev) => this._fail(new HivewireError(`closed (${ev.code} ${ev.reason})`));
    });
  }

  _send(m) {
    if (this.closed) throw new HivewireError("client is closed");
    const msg = { id: this.nextId++, source: this.agentId, ...m };
    this.ws.send(frame(encode(toEnvelope(msg))));
    return msg.id;
  }

  _onMessage(data) {
    this.lastHeard = Date.now();
    let envelopes;
    try {
      envelopes = unframe(new Uint8Array(data), this.maxBody);
    } catch (e) {
      this._fail(e);
      return;
    }
    for (const body of envelopes) {
      let m;
      try {
        m = fromEnvelope(decode(body));
      } catch (e) {
        this._fail(e instanceof HivewireError ? e : new HivewireError(`undecodable envelope: ${e}`));
        return;
      }
      this._dispatch(m);
    }
  }

  _dispatch(m) {
    if (this._handshake) {
      const hs = this._handshake;
      const op = m.kindName === "Control" ? m.fields : null;
      if (op && op.HelloAck) {
        this._handshake = null;
        clearTimeout(hs.timer);
        this.hubId = m.source;
        this.negotiated = { version: op.HelloAck[0], capabilities: op.HelloAck[1], metadata: op.HelloAck[2] };
        this._heartbeat = setInterval(() => this._tick(), this.heartbeatMs);
        hs.resolve(this);
      } else if (op && op.Reject) {
        this._handshake = null;
        clearTimeout(hs.timer);
        hs.reject(new HivewireError(`handshake rejected: ${JSON.stringify(op.Reject[0])}`));
        this.close();
      }
      return;
    }
    switch (m.kindName) {
      case "Heartbeat":
        if (m.correlationId === null || m.correlationId === undefined) {
          this._send({ kind: "Heartbeat", correlationId: m.id, destination: m.source, priority: PRIORITY_CONTROL });
        }
        return;
      case "Response": {
        const p = this.pending.get(m.correlationId);
        if (!p) return;
        this.pending.delete(m.correlationId);
        clearTimeout(p.timer);
        const status = m.fields[0];
        if (status === "Ok") {
          p.resolve(m.payload.length ? decode(m.payload) : null);
        } else {
          const [code, message] = status.Error;
          p.reject(new HivewireError(`request failed with code ${code}: ${message}`, code));
        }
        return;
      }
      case "Event":
      case "Broadcast": {
        const value = m.payload.length ? decode(m.payload) : null;
        let delivered = false;
        for (const [pattern, handlers] of this.subscriptions) {
          if (topicMatches(pattern, m.topic)) {
            for (const h of handlers) h(value, m);
            delivered = true;
          }
        }
        if (!delivered && this.onEvent) this.onEvent(m.topic, value, m);
        return;
      }
      case "Request":
        this._answer(m);
        return;
      case "Control":
        if (m.fields && m.fields.Goodbye) this._fail(new HivewireError(`hub said goodbye: ${m.fields.Goodbye[0]}`));
        return;
      default:
        return;
    }
  }

  async _answer(m) {
    const reply = (status, payload) =>
      this._send({
        kind: { Response: [status] },
        correlationId: m.id,
        destination: m.source,
        payload,
      });
    if (!this.onRequest) {
      reply({ Error: [404, `${this.agentId} answers no requests`] }, new Uint8Array(0));
      return;
    }
    try {
      const value = await this.onRequest(m.method, m.payload.length ? decode(m.payload) : null, m);
      reply("Ok", encode(value ?? null));
    } catch (e) {
      reply({ Error: [500, String(e && e.message ? e.message : e)] }, new Uint8Array(0));
    }
  }

  _tick() {
    if (Date.now() - this.lastHeard > 3 * this.heartbeatMs) {
      this._fail(new HivewireError("hub went silent"));
      return;
    }
    this._send({ kind: "Heartbeat", destination: this.hubId, priority: PRIORITY_CONTROL });
  }

  _fail(err) {
    if (this._handshake) {
      clearTimeout(this._handshake.timer);
      this._handshake.reject(err);
      this._handshake = null;
    }
    if (this.closed) return;
    this.closed = true;
    clearInterval(this._heartbeat);
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(err);
    }
    this.pending.clear();
    try {
      this.ws.close();
    } catch (_) {
      /* already closed */
    }
    if (this.onClose) this.onClose(err);
  }

  /** Calls `method` on agent `to`; resolves to the decoded response payload. */
  request(to, method, value, { timeoutMs = this.timeoutMs } = {}) {
    return new Promise((resolve, reject) => {
      let id;
      try {
        id = this._send({ kind: { Request: [method] }, destination: to, payload: encode(value ?? null) });
      } catch (e) {
        reject(e);
        return;
      }
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new HivewireError(`request ${method} to ${to} timed out after ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer });
    });
  }

  /** Sends an event on `topic` to one agent. */
  send(to, topic, value) {
    this._send({ kind: { Event: [topic] }, destination: to, payload: encode(value ?? null) });
  }

  /** Publishes an event on `topic` to every subscriber. */
  publish(topic, value) {
    this._send({ kind: { Event: [topic] }, payload: encode(value ?? null) });
  }

  /** Broadcasts to every agent of the swarm. */
  broadcast(topic, value) {
    this._send({ kind: { Broadcast: [topic] }, payload: encode(value ?? null) });
  }

  /** Asks the hub for events matching `pattern`; `handler(value, msg)` gets each one. */
  subscribe(pattern, handler) {
    let set = this.subscriptions.get(pattern);
    if (!set) {
      set = new Set();
      this.subscriptions.set(pattern, set);
      this._send({ kind: { Control: { Subscribe: [pattern] } }, priority: PRIORITY_CONTROL });
    }
    set.add(handler);
    return {
      unsubscribe: () => {
        set.delete(handler);
        if (set.size === 0 && this.subscriptions.get(pattern) === set) {
          this.subscriptions.delete(pattern);
          if (!this.closed) this._send({ kind: { Control: { Unsubscribe: [pattern] } }, priority: PRIORITY_CONTROL });
        }
      },
    };
  }

  /** Says goodbye and closes. */
  close() {
    if (this.closed) return;
    try {
      this._send({ kind: { Control: { Goodbye: ["closed"] } }, priority: PRIORITY_CONTROL });
    } catch (_) {
      /* closing anyway */
    }
    this._fail(new HivewireError("closed locally"));
  }
}
