// DOM building. Text from the model or the store only ever reaches the page as textContent:
// no innerHTML anywhere, so a reply or a title can never become markup.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

// Splits text into prose and ``` fenced code blocks (an unclosed fence runs to the end, as while
// streaming). Returns [{code: bool, lang, text}].
export function splitFences(text) {
  const parts = [];
  let current = { code: false, lang: "", lines: [] };
  for (const line of text.split("\n")) {
    const fence = /^\s*```\s*([\w+#.-]*)\s*$/.exec(line);
    if (fence) {
      parts.push(current);
      current = current.code
        ? { code: false, lang: "", lines: [] }
        : { code: true, lang: fence[1], lines: [] };
    } else {
      current.lines.push(line);
    }
  }
  parts.push(current);
  return parts
    .map((p) => ({ code: p.code, lang: p.lang, text: p.lines.join("\n") }))
    .filter((p) => p.code || p.text !== "");
}

// Fills `container` with the rendering of `text`: prose paragraphs and <pre><code> blocks.
export function renderText(container, text) {
  const nodes = splitFences(text).map((part) =>
    part.code
      ? el(
          "pre",
          { class: "code", "aria-label": part.lang ? `${part.lang} code` : "code" },
          el("code", { text: part.text }),
        )
      : el("div", { class: "prose", text: part.text }),
  );
  container.replaceChildren(...nodes);
}

export function formatStatus(done) {
  const bits = [];
  const usage = done.usage || {};
  const timing = done.timing || {};
  if (usage.completion_tokens !== undefined) bits.push(`${usage.completion_tokens} tokens`);
  if (typeof timing.tokens_per_s === "number") bits.push(`${timing.tokens_per_s.toFixed(1)} tok/s`);
  if (done.reason === "cancelled") bits.push("stopped");
  else if (done.reason === "length") bits.push("length limit");
  else if (done.reason === "error") bits.push(`error: ${(done.error && done.error.message) || "failed"}`);
  return bits.join(" · ");
}

export function chatLabel(title, fallback = "New chat") {
  const text = (title || "").trim();
  return text ? text : fallback;
}
