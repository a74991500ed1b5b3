// chat.v1 over one WebSocket: hello/welcome, request ids, and automatic reconnect with backoff.
// Knows nothing about the page; app.js gives it callbacks.

export const SUBPROTOCOL = "chat.v1";
const TOKEN_KEY = "localchat.token";
const BACKOFF_MS = [500, 1000, 2000, 4000, 8000, 15000];

export function wsUrl(location) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/ws`;
}

// The key a load balancer in front of several replicas hashes on (deploy/haproxy.cfg), so that
// this user keeps landing on the same replica: a hash of the token when there is one (the token
// itself never shows in a proxy's logs), else a random id kept in this browser.
const AFFINITY_KEY = "localchat.affinity";

function fnv1a(text) {
  let hash = 0x811c9dc5;
  for (const byte of new TextEncoder().encode(text)) {
    hash = Math.imul(hash ^ byte, 0x01000193) >>> 0;
  }
  return hash.toString(16).padStart(8, "0");
}

export function affinityKey(token, storage = localStorage) {
  if (token) return `t${fnv1a(`a:${token}`)}${fnv1a(`b:${token}`)}`;
  let key = storage.getItem(AFFINITY_KEY);
  if (!key) {
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    key = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    storage.setItem(AFFINITY_KEY, key);
  }
  return key;
}

export function withAffinity(url, key) {
  const sep = url.includes("?") ? "&" : "?";
  return `${url}${sep}affinity=${encodeURIComponent(key)}`;
}

export const tokenStore = {
  get: () => sessionStorage.getItem(TOKEN_KEY),
  set: (token) => sessionStorage.setItem(TOKEN_KEY, token),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

// Callbacks: onWelcome(welcome, isReconnect), onFrame(frame), onState(state, detail),
// onAuthNeeded(hadToken). state: "connecting" | "open" | "down" (detail: retry delay in ms).
export class Connection {
  constructor(url, callbacks) {
    this.url = url;
    this.cb = callbacks;
    this.ws = null;
    this.ready = false;
    this.attempt = 0;
    this.welcomed = false; // at least once: later welcomes are reconnects
    this.nextId = 1;
    this.pending = new Map(); // id -> {resolve, reject}
    this.retryTimer = null;
  }

  connect() {
    clearTimeout(this.retryTimer);
    this.cb.onState("connecting");
    let ws;
    try {
      ws = new WebSocket(withAffinity(this.url, affinityKey(tokenStore.get())), SUBPROTOCOL);
    } catch (err) {
      this.scheduleRetry();
      return;
    }
    this.ws = ws;
    let authFailed = false;
    ws.onopen = () => {
      const hello = { type: "hello", client: "localchat-web" };
      const token = tokenStore.get();
      if (token) hello.token = token;
      ws.send(JSON.stringify(hello));
    };
    ws.onmessage = (event) => {
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      if (frame.type === "welcome") {
        this.ready = true;
        this.attempt = 0;
        const again = this.welcomed;
        this.welcomed = true;
        this.cb.onState("open");
        this.cb.onWelcome(frame, again);
        return;
      }
      if (frame.type === "error" && frame.code === "unauthenticated") {
        authFailed = true;
        return;
      }
      if (frame.id !== undefined && this.pending.has(frame.id)) {
        const waiter = this.pending.get(frame.id);
        this.pending.delete(frame.id);
        waiter.resolve(frame);
      }
      this.cb.onFrame(frame);
    };
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.ready = false;
      for (const waiter of this.pending.values()) waiter.reject(new Error("connection closed"));
      this.pending.clear();
      if (authFailed || event.code === 4401) {
        const hadToken = Boolean(tokenStore.get());
        tokenStore.clear();
        this.cb.onAuthNeeded(hadToken);
        return;
      }
      this.scheduleRetry();
    };
  }

  scheduleRetry() {
    const delay = BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)];
    this.attempt += 1;
    this.cb.onState("down", delay);
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }

  retryNow() {
    if (!this.ws) this.connect();
  }

  send(frame) {
    if (!this.ready) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  // Sends a frame with a fresh id; resolves with the server's direct reply (which may be an error).
  request(frame) {
    const id = `r${this.nextId++}`;
    return new Promise((resolve, reject) => {
      if (!this.send({ ...frame, id })) {
        reject(new Error("not connected"));
        return;
      }
      this.pending.set(id, { resolve, reject });
    });
  }
}
