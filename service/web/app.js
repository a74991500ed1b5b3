// The chat page: several chats (sessions) over one connection, each streaming on its own.
import { Connection, tokenStore, wsUrl } from "./protocol.js";
import { chatLabel, el, formatStatus, renderText } from "./ui.js";

const $ = (id) => document.getElementById(id);
const dom = {
  banner: $("banner"),
  bannerText: $("banner-text"),
  retry: $("retry"),
  conn: $("conn"),
  model: $("model"),
  tabs: $("tabs"),
  past: $("past"),
  pastEmpty: $("past-empty"),
  panes: $("panes"),
  empty: $("empty"),
  newChat: $("new-chat"),
  sidebar: $("sidebar"),
  toggle: $("toggle-sidebar"),
  auth: $("auth"),
  authForm: $("auth-form"),
  authToken: $("auth-token"),
  authMessage: $("auth-message"),
};

const sessions = new Map(); // session id -> Session
let active = null;
let sessionCounter = 0;

const conn = new Connection(wsUrl(window.location), {
  onState: showConnection,
  onWelcome: welcomed,
  onFrame: dispatch,
  onAuthNeeded: askToken,
});

// --- sessions -----------------------------------------------------------------------------------

function newSession({ chat = null, title = null, model = null } = {}) {
  const id = `s${++sessionCounter}`;
  const tabLabel = el("span", { class: "tab-label", text: chatLabel(title) });
  const tab = el(
    "button",
    {
      class: "tab",
      role: "tab",
      id: `tab-${id}`,
      "aria-controls": `pane-${id}`,
      "aria-selected": "false",
      tabindex: "-1",
      onclick: () => select(id),
      onkeydown: (e) => tabKeys(e, id),
    },
    tabLabel,
    el("span", { class: "tab-state", "aria-hidden": "true" }),
  );
  const closeBtn = el("button", {
    class: "tab-close",
    type: "button",
    "aria-label": `Close ${chatLabel(title)}`,
    text: "×",
    onclick: () => closeSession(id),
  });
  const tabItem = el("div", { class: "tab-item" }, tab, closeBtn);
  const log = el("div", { class: "log", role: "log", "aria-live": "polite", "aria-label": "Messages" });
  const textarea = el("textarea", {
    rows: "2",
    placeholder: "Message (Enter to send, Shift+Enter for a new line)",
    "aria-label": "Message",
  });
  const sendBtn = el("button", { type: "submit", class: "send", text: "Send" });
  const stopBtn = el("button", {
    type: "button",
    class: "stop",
    text: "Stop",
    disabled: true,
    "aria-label": "Stop the reply",
    onclick: () => stop(id),
  });
  const onsubmit = (e) => {
    e.preventDefault();
    submit(id);
  };
  const form = el("form", { class: "composer", onsubmit }, textarea, sendBtn, stopBtn);
  textarea.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submit(id);
    }
  });
  const pane = el(
    "section",
    { class: "pane", role: "tabpanel", id: `pane-${id}`, "aria-labelledby": `tab-${id}`, hidden: true },
    log,
    form,
  );
  const s = { id, chat, title, model, tab, tabItem, tabLabel, closeBtn, pane, log, textarea, sendBtn, stopBtn };
  s.reply = null; // the running reply: {view, text, index (next token), message (id, once started)}
  sessions.set(id, s);
  dom.tabs.append(tabItem);
  dom.panes.append(pane);
  dom.empty.hidden = true;
  select(id);
  return s;
}

function select(id) {
  active = id;
  for (const s of sessions.values()) {
    const on = s.id === id;
    s.tab.setAttribute("aria-selected", String(on));
    s.tab.tabIndex = on ? 0 : -1;
    s.pane.hidden = !on;
  }
  const s = sessions.get(id);
  if (s) s.textarea.focus();
  if (window.matchMedia("(max-width: 700px)").matches) setSidebar(false);
}

function tabKeys(event, id) {
  const ids = [...sessions.keys()];
  const at = ids.indexOf(id);
  let next = null;
  if (event.key === "ArrowDown" || event.key === "ArrowRight") next = ids[(at + 1) % ids.length];
  if (event.key === "ArrowUp" || event.key === "ArrowLeft") next = ids[(at - 1 + ids.length) % ids.length];
  if (next) {
    event.preventDefault();
    select(next);
    sessions.get(next).tab.focus();
  }
}

function setTitle(s, title) {
  s.title = title;
  s.tabLabel.textContent = chatLabel(title);
  s.closeBtn.setAttribute("aria-label", `Close ${chatLabel(title)}`);
  if (s.model) s.tab.title = `${chatLabel(title)} (${s.model})`;
}

function setGenerating(s, on) {
  s.stopBtn.disabled = !on;
  s.sendBtn.disabled = on;
  s.tab.classList.toggle("busy", on);
  s.pane.setAttribute("aria-busy", String(on));
}

function closeSession(id) {
  const s = sessions.get(id);
  if (!s) return;
  if (s.chat) conn.send({ type: "close", session: id });
  sessions.delete(id);
  s.tabItem.remove();
  s.pane.remove();
  if (active === id) {
    const rest = [...sessions.keys()];
    if (rest.length) select(rest[rest.length - 1]);
    else {
      active = null;
      dom.empty.hidden = false;
    }
  }
  refreshChats();
}

// --- messages -----------------------------------------------------------------------------------

function addMessage(s, role, text, state = "done") {
  const body = el("div", { class: "body" });
  const status = el("div", { class: "status" });
  const who = { user: "You", assistant: "Assistant", system: "System" }[role] || role;
  const heading = el("div", { class: "who", text: who });
  const node = el("article", { class: `msg ${role}`, "data-state": state }, heading, body, status);
  if (role === "assistant") renderText(body, text);
  else body.textContent = text;
  s.log.append(node);
  node.scrollIntoView({ block: "end" });
  return { node, body, status };
}

function showHistory(s, messages) {
  s.log.replaceChildren();
  for (const m of messages) {
    const view = addMessage(s, m.role, m.text);
    if (m.status && m.status !== "complete") view.status.textContent = m.status;
  }
}

function setReplyState(reply, state, text) {
  reply.view.node.dataset.state = state;
  reply.view.status.textContent = text;
}

// --- actions ------------------------------------------------------------------------------------

async function submit(id) {
  const s = sessions.get(id);
  const text = s.textarea.value;
  if (!text.trim() || s.reply) return;
  if (!conn.ready) {
    showBanner("Not connected: the message was not sent.");
    return;
  }
  s.textarea.value = "";
  addMessage(s, "user", text);
  const view = addMessage(s, "assistant", "", "sending");
  s.reply = { view, text: "", index: 0, message: null };
  setReplyState(s.reply, "sending", "sending…");
  setGenerating(s, true);
  try {
    if (!s.chat) {
      const title = text.trim().split("\n")[0].slice(0, 60);
      const model = dom.model.value || undefined;
      const opened = await conn.request({ type: "open", session: s.id, model, title });
      if (opened.type !== "opened") throw new Error(opened.message || opened.code);
      s.chat = opened.chat;
      s.model = opened.model;
      noteBaseModel(s);
      setTitle(s, title);
      refreshChats();
    }
    conn.send({ type: "send", session: s.id, text });
  } catch (err) {
    failReply(s, `not sent: ${err.message}`);
  }
}

function failReply(s, message) {
  if (!s.reply) return;
  setReplyState(s.reply, "error", message);
  s.reply = null;
  setGenerating(s, false);
}

function stop(id) {
  const s = sessions.get(id);
  if (s && s.reply) conn.send({ type: "stop", session: id });
}

async function openChat(chatId) {
  for (const s of sessions.values()) {
    if (s.chat === chatId) {
      select(s.id);
      return;
    }
  }
  const blank = sessions.get(active);
  if (blank && !blank.chat && !blank.reply && !blank.log.hasChildNodes()) closeSession(blank.id);
  const s = newSession({ chat: chatId, title: null });
  renderPast();
  try {
    const opened = await conn.request({ type: "open", session: s.id, chat: chatId });
    if (opened.type !== "opened") throw new Error(opened.message || opened.code);
    s.model = opened.model;
    const listed = pastTitles.get(chatId);
    setTitle(s, listed || null);
    showHistory(s, opened.messages);
    noteBaseModel(s);
  } catch (err) {
    s.log.replaceChildren(el("p", { class: "note", text: `Could not open the chat: ${err.message}` }));
    s.chat = null;
    renderPast();
  }
}

async function deleteChat(chatId) {
  for (const s of [...sessions.values()]) if (s.chat === chatId) closeSession(s.id);
  try {
    await conn.request({ type: "delete", chat: chatId });
  } finally {
    refreshChats();
  }
}

// --- past chats ---------------------------------------------------------------------------------

const pastTitles = new Map();
// The last `chats` reply; null until the first one arrives (the list shows "Loading…" meanwhile).
let pastChats = null;

async function refreshChats() {
  if (!conn.ready) return;
  let reply;
  try {
    reply = await conn.request({ type: "chats", limit: 50 });
  } catch {
    return;
  }
  if (reply.type !== "chats") return;
  pastChats = reply.chats;
  pastTitles.clear();
  for (const c of pastChats) pastTitles.set(c.chat, c.title);
  renderPast();
}

// Past chats are the saved chats that are not open: an open chat is listed once, under "Open chats".
function renderPast() {
  if (pastChats === null) {
    dom.past.setAttribute("aria-busy", "true");
    dom.pastEmpty.textContent = "Loading past chats…";
    dom.pastEmpty.hidden = false;
    return;
  }
  const open = new Set([...sessions.values()].map((s) => s.chat).filter(Boolean));
  const items = pastChats
    .filter((c) => !open.has(c.chat))
    .map((c) => {
      const label = chatLabel(c.title, "Untitled chat");
      const when = c.updated_at ? new Date(c.updated_at).toLocaleString() : "";
      return el(
        "li",
        { class: "past-item", "data-chat": c.chat },
        el(
          "button",
          { class: "past-open", type: "button", title: `${c.model} · ${when}`, onclick: () => openChat(c.chat) },
          el("span", { class: "past-title", text: label }),
          el("span", { class: "past-meta", text: `${c.messages} msgs · ${when}` }),
        ),
        el("button", {
          class: "past-delete",
          type: "button",
          text: "Delete",
          "aria-label": `Delete ${label}`,
          onclick: () => {
            if (confirm(`Delete "${label}" and all its messages? This cannot be undone.`)) deleteChat(c.chat);
          },
        }),
      );
    });
  dom.past.replaceChildren(...items);
  dom.past.setAttribute("aria-busy", "false");
  dom.pastEmpty.textContent = pastChats.length ? "Every saved chat is open." : "No saved chats yet.";
  dom.pastEmpty.hidden = items.length > 0;
}

// --- frames -------------------------------------------------------------------------------------

function dispatch(frame) {
  if (frame.type === "models") return setModels(frame.models);
  const s = frame.session !== undefined ? sessions.get(frame.session) : null;
  if (!s) {
    if (frame.type === "error" && frame.id === undefined) showBanner(`Server error: ${frame.message}`);
    return;
  }
  const reply = s.reply;
  switch (frame.type) {
    case "started":
      if (!reply) return;
      reply.message = frame.message;
      if (frame.queue_position > 0) setReplyState(reply, "queued", `queued (position ${frame.queue_position})`);
      else setReplyState(reply, "generating", "generating…");
      break;
    case "token": {
      if (!reply) return;
      const count = frame.tokens || 1;
      if (frame.index + count <= reply.index) return; // already have it (replayed on resume)
      reply.text += frame.text;
      reply.index = frame.index + count;
      renderText(reply.view.body, reply.text);
      if (reply.view.node.dataset.state !== "generating") setReplyState(reply, "generating", "generating…");
      reply.view.node.scrollIntoView({ block: "end" });
      break;
    }
    case "done":
      if (!reply) return;
      setReplyState(reply, frame.reason === "error" ? "error" : "done", formatStatus(frame));
      s.reply = null;
      setGenerating(s, false);
      refreshChats();
      break;
    case "error":
      if (frame.code === "busy") return;
      if (reply && !reply.message) failReply(s, `error: ${frame.message}`);
      else s.log.append(el("p", { class: "note", text: `Error: ${frame.message}` }));
      break;
    default:
      break;
  }
}

// Models without a chat template (`chat: false`): the server chats with them through a plain
// "User: … / Assistant: …" transcript.
const baseModels = new Set();

function setModels(list) {
  const previous = dom.model.value;
  baseModels.clear();
  const options = list.map((m) => {
    if (m.chat === false) baseModels.add(m.id);
    const notes = [m.chat === false ? "base model" : "", m.loaded === false ? "not loaded" : ""].filter(Boolean);
    const text = notes.length ? `${m.id} (${notes.join(", ")})` : m.id;
    return el("option", { value: m.id, text, selected: previous ? m.id === previous : m.default });
  });
  dom.model.replaceChildren(...options);
}

function noteBaseModel(s) {
  if (!baseModels.has(s.model)) return;
  s.log.prepend(
    el("p", {
      class: "note base-model",
      text: `${s.model} is a base model, not a chat model: it continues a plain "User: … / Assistant: …" transcript rather than following instructions.`,
    }),
  );
}

// --- connection ---------------------------------------------------------------------------------

function welcomed(welcome, isReconnect) {
  hideBanner();
  dom.conn.textContent = `Connected as ${welcome.user.name}`;
  setModels(welcome.models);
  refreshChats();
  if (isReconnect) for (const s of sessions.values()) reopen(s);
}

// After a reconnect, sessions are gone server-side: open each chat again, resuming a running reply.
async function reopen(s) {
  if (!s.chat) {
    if (s.reply) failReply(s, "not sent: the connection dropped");
    return;
  }
  const frame = { type: "open", session: s.id, chat: s.chat };
  const reply = s.reply;
  if (reply && reply.message) frame.resume = { message: reply.message, index: reply.index };
  let opened;
  try {
    opened = await conn.request(frame);
  } catch {
    return; // dropped again: the next welcome tries again
  }
  if (opened.type !== "opened") {
    if (reply) failReply(s, "lost: the connection dropped");
    s.log.append(el("p", { class: "note", text: `Could not reopen the chat: ${opened.message}` }));
    return;
  }
  if (!reply) return showHistory(s, opened.messages);
  if (!reply.message) {
    finishFromStore(s, reply, opened.messages);
    s.log.append(el("p", { class: "note", text: "The connection dropped before the reply started." }));
  } else if (!finishFromStore(s, reply, opened.messages)) {
    watchResume(s, reply);
  }
}

// The reply ended while we were away when the store has it: show the stored history instead.
function finishFromStore(s, reply, messages) {
  const stored = messages.find((m) => m.id === reply.message);
  if (reply.message && !stored) return false;
  if (s.reply !== reply) return true;
  s.reply = null;
  setGenerating(s, false);
  showHistory(s, messages);
  return true;
}

// A resumed reply streams on from reply.index. If the service no longer had it running (it was
// cancelled at the disconnect), nothing comes: look for it in the stored history now and then.
function watchResume(s, reply) {
  let seen = reply.index;
  let delay = 1000;
  const check = async () => {
    if (s.reply !== reply || !sessions.has(s.id) || !conn.ready) return;
    if (reply.index === seen) {
      try {
        const history = await conn.request({ type: "history", chat: s.chat });
        if (history.type === "history" && finishFromStore(s, reply, history.messages)) return;
      } catch {
        return; // dropped again: the next welcome reopens the chat
      }
    }
    seen = reply.index;
    delay = Math.min(delay * 2, 8000);
    setTimeout(check, delay);
  };
  setTimeout(check, delay);
}

function showConnection(state, delay) {
  if (state === "connecting") dom.conn.textContent = "Connecting…";
  if (state === "down") {
    dom.conn.textContent = "Disconnected";
    showBanner(`Connection lost. Reconnecting in ${Math.round(delay / 100) / 10} s…`, true);
  }
  for (const s of sessions.values()) s.sendBtn.disabled = state !== "open" || Boolean(s.reply);
}

function showBanner(text, retry = false) {
  dom.bannerText.textContent = text;
  dom.retry.hidden = !retry;
  dom.banner.hidden = false;
}

function hideBanner() {
  dom.banner.hidden = true;
}

function askToken(hadToken) {
  dom.conn.textContent = "Token needed";
  dom.authMessage.textContent = hadToken
    ? "That token was not accepted. Enter a valid access token."
    : "This service needs an access token.";
  if (!dom.auth.open) dom.auth.showModal();
  dom.authToken.focus();
}

// --- page wiring --------------------------------------------------------------------------------

function setSidebar(open) {
  dom.sidebar.classList.toggle("open", open);
  dom.toggle.setAttribute("aria-expanded", String(open));
}

dom.authForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const token = dom.authToken.value.trim();
  if (!token) return;
  tokenStore.set(token);
  dom.authToken.value = "";
  dom.auth.close();
  conn.connect();
});
dom.auth.addEventListener("cancel", (e) => e.preventDefault());
dom.retry.addEventListener("click", () => conn.retryNow());
dom.newChat.addEventListener("click", () => newSession());
dom.toggle.addEventListener("click", () => setSidebar(!dom.sidebar.classList.contains("open")));

conn.connect();
newSession();
