// <course-assistant>: the chat widget, as one custom element with a shadow root.
//
// The chat page (/) shows it filling the window; a course platform drops it into a
// lesson page as a panel (see README, "Embedding the widget"):
//
//   <script type="module" src="https://assistant.example/static/assistant.js"></script>
//   <course-assistant course="bread-science" token="<the learner's JWT>"></course-assistant>
//
// Attributes: course (a course key; without it the learner picks from their courses),
// token (a bearer token; or set el.getToken = async () => token to refresh it),
// dev-user (development identity, sent as X-User-Id), user (a stable id to keep the
// current session under, when the token changes), api (the service's origin; default:
// where this script came from), mode ("panel", the default, or "page").
//
// Answers are Markdown, rendered as they stream (marked) and sanitized (DOMPurify)
// with raw HTML escaped first: nothing the model or a course writes runs or styles
// the page. Both libraries are vendored (static/vendor/README.md); no build step.

import { Marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.mjs";

const SCRIPT_ORIGIN = new URL(import.meta.url).origin;

// ---------------------------------------------------------------- rendering

const escapeHtml = (s) =>
  String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

const marked = new Marked({ gfm: true, breaks: false });
marked.use({
  // Raw HTML in the Markdown (an answer's or a course's) is shown as text, not parsed.
  renderer: { html: ({ text }) => escapeHtml(text) },
  extensions: [
    {
      // [n] (not a link's [text](url); [1][3] is two citations) cites source n: a link once the sources are known.
      name: "cite",
      level: "inline",
      start: (src) => src.match(/\[\d{1,3}\]/)?.index,
      tokenizer(src) {
        const m = /^\[(\d{1,3})\](?!\()/.exec(src);
        return m ? { type: "cite", raw: m[0], n: Number(m[1]) } : undefined;
      },
      renderer: (token) => `<a class="cite" href="#" data-cite="${token.n}">[${token.n}]</a>`,
    },
  ],
});

const ANSWER_TAGS = ["p", "br", "strong", "em", "del", "code", "pre", "blockquote", "ul", "ol", "li",
  "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td", "a", "hr", "span"];
const PURIFY_ANSWER = {
  ALLOWED_TAGS: ANSWER_TAGS,
  ALLOWED_ATTR: ["href", "title", "class", "start", "align", "data-cite"],
  ALLOW_DATA_ATTR: false,
};
const PURIFY_TOPIC = {
  ALLOWED_TAGS: ANSWER_TAGS,
  ALLOWED_ATTR: ["href", "title", "start", "align", "id", "data-anchor"],
  ALLOW_DATA_ATTR: false,
};
// Links the model or a course writes open in a new tab and pass nothing on.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.getAttribute("href") && !node.classList.contains("cite")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

/** Markdown as sanitized HTML. */
export function renderMarkdown(text) {
  return DOMPurify.sanitize(marked.parse(text || ""), PURIFY_ANSWER);
}

// ---------------------------------------------------------------- words for learners

// What a learner is told when something fails, by error code. The error's own message
// is for operators (it names the provider, the attempts): it stays in the job
// (GET /v1/jobs/{id}) and the service's log, and in the console here.
const LEARNER_MESSAGES = {
  provider_unavailable: "The assistant can't reach its language model right now. Please try again in a moment.",
  model_busy: "The assistant is very busy right now. Please try again in a moment.",
  attempts_exhausted: "Something went wrong while answering this question. Please ask it again.",
  rate_limited: "You're asking faster than the assistant can answer. Please wait a moment and try again.",
  too_many_inflight: "Please wait for your other questions to be answered, then try again.",
  overloaded: "The assistant is very busy right now. Please try again in a moment.",
  redis_unavailable: "The assistant is briefly unavailable. Please try again in a moment.",
  database_unavailable: "The assistant is briefly unavailable. Please try again in a moment.",
  service_unavailable: "The assistant is briefly unavailable. Please try again in a moment.",
  cancelled: "You stopped this answer.",
  unauthorized: "Your sign-in has expired. Reload the page to sign in again.",
  provider_rejected: "The assistant couldn't answer this question. Please rephrase it.",
};
const SHOW_OWN_MESSAGE = new Set(["invalid_request", "forbidden", "not_found"]);
const NO_RETRY = new Set(["invalid_request", "forbidden", "not_found", "provider_rejected"]);
const STATUS_WORDS = { queued: "Waiting for the assistant…", running: "Thinking…",
  retrieving: "Reading the course…", generating: "Writing…" };

function learnerMessage(error) {
  const code = (error && error.code) || "";
  if (LEARNER_MESSAGES[code]) return LEARNER_MESSAGES[code];
  if (SHOW_OWN_MESSAGE.has(code) && error.message) return error.message;
  return "Something went wrong while answering. Please try again.";
}

// ---------------------------------------------------------------- styles

const STYLE = `
/* Lengths are in em and px, never rem: rem follows the host page's root font size. */
:host { all: initial; display: block; }
/* Everything is set on the shadow tree's own top elements, not inherited from the host
   element: a host page's "* { font-size: 40px !important }" reaches the host element,
   and what it inherits would reach in. */
.panel, .launcher {
  --bg: #ffffff; --fg: #1d2330; --muted: #5b6472; --line: #d9dee7; --soft: #f3f5f9;
  --accent: #2f5bd3; --accent-fg: #ffffff; --user: #e8eefc; --danger: #a31c1c; --code: #f1f3f7;
  --focus: #1b4fd8; --shadow: 0 8px 30px rgba(20, 30, 60, .18);
  color-scheme: light dark; font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--fg); letter-spacing: normal; word-spacing: normal; text-transform: none;
  text-align: left; text-indent: 0; text-shadow: none; white-space: normal; visibility: visible;
  cursor: auto; direction: ltr; font-style: normal; font-weight: 400; }
@media (prefers-color-scheme: dark) {
  .panel, .launcher { --bg: #15181e; --fg: #e6e9ef; --muted: #a3acba; --line: #2f3542; --soft: #1d2129;
    --accent: #7c9cff; --accent-fg: #0d1020; --user: #243150; --danger: #ff8a8a; --code: #232833;
    --focus: #9db4ff; --shadow: 0 8px 30px rgba(0, 0, 0, .5); }
}
* { box-sizing: border-box; }
[hidden] { display: none !important; }
button, select, textarea { font: inherit; color: inherit; }
button { cursor: pointer; border: 1px solid var(--line); background: var(--bg); border-radius: 8px; padding: .35em .7em; }
button:hover { background: var(--soft); }
button:focus-visible, select:focus-visible, textarea:focus-visible, a:focus-visible {
  outline: 2px solid var(--focus); outline-offset: 2px; }
a { color: var(--accent); }
.sr-only { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); white-space: nowrap; }

.launcher { position: fixed; right: 20px; bottom: 20px; z-index: 2147483000; border: none;
  background: var(--accent); color: var(--accent-fg); border-radius: 999px; padding: .75em 1.1em;
  box-shadow: var(--shadow); font-weight: 600; }
.launcher:hover { background: var(--accent); filter: brightness(1.08); }
.panel { display: flex; flex-direction: column; background: var(--bg); color: var(--fg); overflow: hidden; }
:host([mode="page"]) .panel { height: 100%; min-height: 100%; }
:host(:not([mode="page"])) .panel { position: fixed; right: 20px; bottom: 84px; z-index: 2147483000;
  width: min(420px, calc(100vw - 24px)); height: min(640px, calc(100vh - 110px));
  border: 1px solid var(--line); border-radius: 14px; box-shadow: var(--shadow); }
@media (max-width: 480px) {
  :host(:not([mode="page"])) .panel { right: 0; bottom: 0; width: 100vw; height: 100dvh; border-radius: 0; }
  :host(:not([mode="page"])) .panel:not([hidden]) ~ .launcher { display: none; }
}

.bar { display: flex; align-items: center; gap: .5em; padding: .55em .75em; border-bottom: 1px solid var(--line); min-height: 3em; }
.bar .name { font-weight: 650; white-space: nowrap; }
.bar .course { min-width: 0; max-width: 16em; flex: 0 1 auto; padding: .25em; border: 1px solid var(--line); border-radius: 8px; background: var(--bg); }
.bar .course-title { color: var(--muted); white-space: nowrap; overflow: hidden; text-overflow: ellipsis; min-width: 0; }
.bar .spacer { flex: 1; }
.bar .state { color: var(--danger); font-size: .85em; }
.icon { padding: .3em .55em; }

.main { position: relative; flex: 1; display: flex; min-height: 0; }
.sessions { width: 15em; flex: none; border-right: 1px solid var(--line); overflow-y: auto; padding: .5em; background: var(--soft); }
.sessions h2 { font-size: .8em; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); margin: .3em .3em .5em; }
.sessions ul { list-style: none; margin: 0; padding: 0; }
.sessions li button { display: block; width: 100%; text-align: left; border: none; background: transparent; padding: .45em .5em; }
.sessions li button[aria-current="true"] { background: var(--bg); font-weight: 600; }
.sessions li button:hover { background: var(--bg); }
.sessions .when { display: block; color: var(--muted); font-size: .78em; }
.sessions .empty-list { color: var(--muted); padding: .5em; font-size: .9em; }
.sessions .more { width: 100%; margin-top: .3em; }
@media (max-width: 720px) { .sessions { position: absolute; inset: 0 auto 0 0; z-index: 3; width: min(85%, 18em); box-shadow: var(--shadow); } }

.thread { flex: 1; overflow-y: auto; padding: 1em .9em 1.5em; overscroll-behavior: contain; }
.messages, .welcome, .earlier { max-width: 48em; margin-left: auto; margin-right: auto; }
.bar .new { white-space: nowrap; }
:host(:not([mode="page"])) .bar .course-title:not([hidden]) ~ .spacer { display: none; }
:host(:not([mode="page"])) .bar:has(.course-title:not([hidden])) .name { display: none; }
.bar .course-title { flex: 1; font-weight: 600; color: var(--fg); }
@media (max-width: 480px) { .bar .name { display: none; } .hint { display: none; } }
.welcome { color: var(--muted); text-align: center; margin: 3em 1em; }
.welcome strong { display: block; color: var(--fg); font-size: 1.1em; margin-bottom: .3em; }
.earlier { display: block; margin: 0 auto 1em; }
.msg { display: flex; margin: 0 0 1em; }
.msg.user { justify-content: flex-end; }
.msg.user .bubble { background: var(--user); border-radius: 14px 14px 4px 14px; padding: .5em .8em; max-width: 85%; white-space: pre-wrap; overflow-wrap: anywhere; }
.msg.assistant .bubble { max-width: 100%; width: 100%; overflow-wrap: anywhere; }
.thinking { color: var(--muted); display: inline-flex; align-items: center; gap: .5em; }
.dots { display: inline-flex; gap: 3px; }
.dots i { width: 6px; height: 6px; border-radius: 50%; background: var(--muted); animation: blink 1.2s infinite ease-in-out; }
.dots i:nth-child(2) { animation-delay: .2s; } .dots i:nth-child(3) { animation-delay: .4s; }
@keyframes blink { 0%, 80%, 100% { opacity: .25; } 40% { opacity: 1; } }
@media (prefers-reduced-motion: reduce) { .dots i { animation: none; } }

.answer > :first-child { margin-top: 0; } .answer > :last-child { margin-bottom: 0; }
.answer p, .answer ul, .answer ol, .answer pre, .answer table, .answer blockquote { margin: 0 0 .7em; }
.answer h1, .answer h2, .answer h3, .answer h4 { font-size: 1.02em; margin: .9em 0 .4em; }
.answer code { background: var(--code); padding: .08em .3em; border-radius: 4px; font: .88em/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.answer pre { background: var(--code); padding: .7em .8em; border-radius: 8px; overflow-x: auto; }
.answer pre code { background: none; padding: 0; }
.answer table { border-collapse: collapse; display: block; overflow-x: auto; }
.answer th, .answer td { border: 1px solid var(--line); padding: .3em .55em; text-align: left; }
.answer blockquote { border-left: 3px solid var(--line); padding-left: .8em; color: var(--muted); }
.answer a.cite { text-decoration: none; font-size: .8em; vertical-align: super; line-height: 0; padding: 0 .1em; font-weight: 600; }
.answer span.cite { font-size: .8em; vertical-align: super; line-height: 0; color: var(--muted); }
.note { color: var(--muted); font-size: .88em; margin: .3em 0 0; }
.failed .error { color: var(--danger); margin: 0; }

.sources { list-style: none; margin: .6em 0 0; padding: 0; display: grid; gap: .35em; }
.sources li a { display: block; text-decoration: none; color: inherit; border: 1px solid var(--line); border-radius: 8px; padding: .4em .6em; }
.sources li a:hover { background: var(--soft); }
.sources .n { color: var(--accent); font-weight: 700; margin-right: .3em; }
.sources .topic { font-weight: 600; }
.sources .section { color: var(--muted); }
.sources .snippet { display: block; color: var(--muted); font-size: .85em; margin-top: .15em; }
.sources li.flash a { outline: 2px solid var(--accent); }
.actions { display: flex; gap: .35em; margin-top: .45em; align-items: center; flex-wrap: wrap; }
.actions button { font-size: .82em; padding: .2em .55em; }
.actions .served { color: var(--muted); font-size: .8em; }

.jump { position: absolute; left: 50%; transform: translateX(-50%); bottom: .6em; z-index: 2; box-shadow: var(--shadow); }

.reader { position: absolute; inset: 0; z-index: 4; background: var(--bg); display: flex; flex-direction: column; }
.reader header { display: flex; align-items: center; gap: .6em; padding: .5em .8em; border-bottom: 1px solid var(--line); }
.reader header h2 { font-size: 1em; margin: 0; }
.reader header .module { display: block; color: var(--muted); font-size: .85em; }
.reader header .back { white-space: nowrap; flex: none; }
.reader .topic-body h1 { font-size: 1.3em; } .reader .topic-body h2 { font-size: 1.15em; }
.reader .topic-body h3, .reader .topic-body h4 { font-size: 1.02em; }
.reader .topic-body pre { background: var(--code); padding: .7em .8em; border-radius: 8px; overflow-x: auto; }
.reader .topic-body code { background: var(--code); padding: .08em .3em; border-radius: 4px; font: .88em/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.reader .topic-body table { border-collapse: collapse; display: block; overflow-x: auto; }
.reader .topic-body th, .reader .topic-body td { border: 1px solid var(--line); padding: .3em .55em; }
.reader .topic-body { overflow-y: auto; padding: .8em 1em 2em; flex: 1; }
.reader .topic-body :target, .reader .topic-body .target { background: color-mix(in srgb, var(--accent) 18%, transparent); border-radius: 4px; }
.reader h1, .reader h2, .reader h3 { scroll-margin-top: .5em; }

.composer { display: flex; gap: .5em; align-items: flex-end; padding: .6em .75em .3em; border-top: 1px solid var(--line); background: var(--bg); }
.composer textarea { flex: 1; resize: none; min-height: 2.6em; max-height: 10em; padding: .55em .7em; border: 1px solid var(--line); border-radius: 10px; background: var(--bg); line-height: 1.4; }
.composer .send { background: var(--accent); color: var(--accent-fg); border-color: var(--accent); font-weight: 600; min-height: 2.6em; }
.composer .stop { min-height: 2.6em; }
.composer button:disabled { opacity: .5; cursor: not-allowed; }
.hint { margin: 0; padding: 0 .8em .5em; color: var(--muted); font-size: .75em; }
`;

const TEMPLATE = `
<section class="panel" part="panel" role="region" aria-label="Course assistant">
  <header class="bar">
    <button type="button" class="icon toggle-sessions" aria-label="Conversations" aria-expanded="false" title="Conversations">☰</button>
    <span class="name">Course Assistant</span>
    <label class="sr-only" for="ca-course">Course</label>
    <select class="course" id="ca-course"></select>
    <span class="course-title" hidden></span>
    <span class="spacer"></span>
    <span class="state" role="status"></span>
    <button type="button" class="new" title="Start a new conversation">New chat</button>
    <button type="button" class="icon close" aria-label="Close the assistant" title="Close">✕</button>
  </header>
  <div class="main">
    <nav class="sessions" aria-label="Your conversations in this course" hidden>
      <h2>Conversations</h2>
      <ul></ul>
      <p class="empty-list" hidden>No earlier conversations.</p>
      <button type="button" class="more" hidden>Load more</button>
    </nav>
    <div class="thread" role="region" tabindex="0" aria-label="Conversation">
      <button type="button" class="earlier" hidden>Show earlier messages</button>
      <div class="messages"></div>
      <div class="welcome"><strong>Ask about this course</strong>Answers come from the course's own text, with links to the sections they use.</div>
    </div>
    <button type="button" class="jump" hidden>↓ Latest</button>
    <article class="reader" hidden aria-label="Course text" tabindex="-1">
      <header><button type="button" class="back" aria-label="Back to the chat">← Back</button><div><h2></h2><span class="module"></span></div></header>
      <div class="topic-body"></div>
    </article>
  </div>
  <form class="composer">
    <label class="sr-only" for="ca-question">Your question</label>
    <textarea id="ca-question" rows="1" aria-describedby="ca-hint" placeholder="Ask a question about this course" autocomplete="off" maxlength="4000"></textarea>
    <button type="button" class="stop" hidden>Stop</button>
    <button type="submit" class="send">Send</button>
  </form>
  <p class="hint" id="ca-hint">Enter to send · Shift+Enter for a new line</p>
  <div class="sr-only announce" aria-live="polite" aria-atomic="true"></div>
</section>
<button type="button" class="launcher" part="launcher" aria-expanded="false">Ask the course assistant</button>
`;

// ---------------------------------------------------------------- the element

class CourseAssistant extends HTMLElement {
  constructor() {
    super();
    this.getToken = null; // async () => token, set by a host page that refreshes tokens
    this.root = this.attachShadow({ mode: "open" });
    this.root.innerHTML = `<style>${STYLE}</style>${TEMPLATE}`;
    const $ = (s) => this.root.querySelector(s);
    this.el = {
      panel: $(".panel"), launcher: $(".launcher"), close: $(".close"), course: $(".course"),
      courseTitle: $(".course-title"), state: $(".state"), newChat: $(".new"),
      toggleSessions: $(".toggle-sessions"), sessions: $(".sessions"), sessionList: $(".sessions ul"),
      sessionsEmpty: $(".sessions .empty-list"), more: $(".sessions .more"), thread: $(".thread"),
      messages: $(".messages"), welcome: $(".welcome"), earlier: $(".earlier"), jump: $(".jump"),
      reader: $(".reader"), readerTitle: $(".reader h2"), readerModule: $(".reader .module"),
      readerBody: $(".topic-body"), back: $(".back"), form: $(".composer"), input: $("textarea"),
      send: $(".send"), stop: $(".stop"), announce: $(".announce"),
    };
    this.sessionId = null;
    this.running = null; // {jobId, abort, view}
    this.stick = true;
    this.sessionsCursor = null;
    this.earlierCursor = null;
    this.wire();
  }

  connectedCallback() {
    if (this.started) return;
    this.started = true;
    const page = this.getAttribute("mode") === "page";
    this.el.launcher.hidden = page;
    this.el.close.hidden = page;
    this.el.panel.hidden = !page;
    this.start();
  }

  // ------------------------------------------------------------ identity and HTTP

  get api() { return (this.getAttribute("api") || SCRIPT_ORIGIN).replace(/\/$/, ""); }

  async headers(extra = {}) {
    const headers = { ...extra };
    const token = this.getToken ? await this.getToken() : this.getAttribute("token");
    if (token) headers.Authorization = `Bearer ${token}`;
    else if (this.getAttribute("dev-user")) headers["X-User-Id"] = this.getAttribute("dev-user");
    return headers;
  }

  /** fetch against the API; the parsed JSON body and the response. */
  async call(path, { method = "GET", body, headers = {}, signal } = {}) {
    const init = { method, signal, headers: await this.headers(headers) };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
    const resp = await fetch(this.api + path, init);
    let json = null;
    try { json = await resp.json(); } catch { /* no body */ }
    return { resp, json };
  }

  /** Whose conversations this browser keeps (not an identity: the API checks that). */
  get who() { return this.getAttribute("user") || this.getAttribute("dev-user") || "me"; }

  /** Where ``what`` is kept: per course (the session, a question in flight) or not
   * (the last course picked). */
  storageKey(what, perCourse = true) {
    const course = perCourse ? `${this.courseKey}:` : "";
    return `course-assistant:${this.api}:${this.who}:${course}${what}`;
  }

  remember(what, value, perCourse = true) {
    try {
      if (value === null) localStorage.removeItem(this.storageKey(what, perCourse));
      else localStorage.setItem(this.storageKey(what, perCourse), JSON.stringify(value));
    } catch { /* storage off (private mode): the session lasts as long as the page */ }
  }

  recall(what, perCourse = true) {
    try { return JSON.parse(localStorage.getItem(this.storageKey(what, perCourse)) || "null"); } catch { return null; }
  }

  // ------------------------------------------------------------ wiring

  wire() {
    const el = this.el;
    el.launcher.addEventListener("click", () => this.setOpen(el.panel.hidden));
    el.close.addEventListener("click", () => this.setOpen(false));
    el.form.addEventListener("submit", (e) => { e.preventDefault(); this.submit(); });
    el.input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); this.submit(); }
    });
    el.input.addEventListener("input", () => this.grow());
    el.stop.addEventListener("click", () => this.stopRunning());
    el.newChat.addEventListener("click", () => this.newChat());
    el.course.addEventListener("change", () => this.useCourse(el.course.value));
    el.toggleSessions.addEventListener("click", () => this.toggleSessions());
    el.more.addEventListener("click", () => this.loadSessions(false));
    el.earlier.addEventListener("click", () => this.loadEarlier());
    el.back.addEventListener("click", () => this.closeReader());
    el.jump.addEventListener("click", () => { this.stick = true; this.scrollDown(); });
    el.thread.addEventListener("scroll", () => {
      const t = el.thread;
      this.stick = t.scrollHeight - t.scrollTop - t.clientHeight < 48;
      if (this.stick) el.jump.hidden = true;
    });
    this.root.addEventListener("keydown", (e) => {
      if (e.key !== "Escape") return;
      if (!el.reader.hidden) { e.preventDefault(); this.closeReader(); }
      else if (!el.sessions.hidden) { e.preventDefault(); this.toggleSessions(false); el.toggleSessions.focus(); }
      else if (this.getAttribute("mode") !== "page" && !el.panel.hidden) {
        e.preventDefault(); this.setOpen(false); el.launcher.focus();
      }
    });
    // Citation links and source entries open the topic at its section.
    el.messages.addEventListener("click", (e) => {
      const link = e.target.closest("a.cite, .sources a");
      if (!link) return;
      e.preventDefault();
      const view = link.closest(".msg");
      const n = Number(link.dataset.cite || link.dataset.n);
      const citation = (view.citations || []).find((c) => c.id === n);
      if (citation) this.openTopic(citation, link);
    });
  }

  setOpen(open) {
    this.el.panel.hidden = !open;
    this.el.launcher.setAttribute("aria-expanded", String(open));
    this.el.launcher.textContent = open ? "Close the assistant" : "Ask the course assistant";
    if (open) this.el.input.focus();
  }

  grow() {
    const input = this.el.input;
    input.style.height = "auto";
    input.style.height = `${Math.min(input.scrollHeight, 160)}px`;
  }

  // ------------------------------------------------------------ start-up

  async start() {
    this.ready();
    const fixed = this.getAttribute("course");
    const courses = await this.loadCourses();
    if (fixed) {
      this.el.course.hidden = true;
      const found = courses.find((c) => c.course_key === fixed);
      this.el.courseTitle.textContent = found ? found.title : fixed;
      this.el.courseTitle.hidden = false;
      await this.useCourse(fixed);
    } else if (courses.length) {
      const last = this.recall("course", false);
      await this.useCourse(courses.some((c) => c.course_key === last) ? last : courses[0].course_key);
    } else {
      this.el.course.hidden = true;
      this.el.welcome.innerHTML = "<strong>No course yet</strong>You're not enrolled in a course that has the assistant.";
      this.el.input.disabled = this.el.send.disabled = true;
    }
  }

  async ready() {
    try {
      const { json } = await this.call("/ready");
      const ok = json && json.status === "ok";
      this.dataset.ready = String(ok);
      this.el.state.textContent = ok ? "" : "The assistant is unavailable right now";
    } catch {
      this.dataset.ready = "false";
      this.el.state.textContent = "Can't reach the assistant";
    }
  }

  async loadCourses() {
    const courses = [];
    let cursor = "";
    try {
      for (let page = 0; page < 10; page++) {
        const { resp, json } = await this.call(`/v1/courses?limit=100&cursor=${encodeURIComponent(cursor)}`);
        if (!resp.ok) { console.info("courses:", json); break; }
        courses.push(...json.items);
        if (!json.next_cursor) break;
        cursor = json.next_cursor;
      }
    } catch (err) { console.info("courses:", err); }
    this.el.course.replaceChildren(...courses.map((c) => new Option(c.title, c.course_key)));
    return courses;
  }

  async useCourse(key) {
    this.courseKey = key;
    this.el.course.value = key;
    this.remember("course", key, false);
    this.closeReader();
    this.clearThread();
    this.sessionId = this.recall("session");
    this.loadSessions(true);
    if (this.sessionId) await this.openSession(this.sessionId, { keepPending: true });
    const pending = this.recall("pending");
    if (pending && pending.session_id === this.sessionId) this.resume(pending);
    this.dataset.course = key;
  }

  // ------------------------------------------------------------ sessions

  toggleSessions(force) {
    const open = force ?? this.el.sessions.hidden;
    this.el.sessions.hidden = !open;
    this.el.toggleSessions.setAttribute("aria-expanded", String(open));
    if (open) this.el.sessions.querySelector("button")?.focus();
  }

  async loadSessions(first) {
    if (first) { this.sessionsCursor = null; this.el.sessionList.replaceChildren(); }
    const cursor = this.sessionsCursor ? `&cursor=${encodeURIComponent(this.sessionsCursor)}` : "";
    try {
      const { resp, json } = await this.call(`/v1/sessions?course_key=${encodeURIComponent(this.courseKey)}&limit=20${cursor}`);
      if (!resp.ok) { console.info("sessions:", json); return; }
      for (const s of json.items) this.el.sessionList.append(this.sessionItem(s));
      this.sessionsCursor = json.next_cursor;
      this.el.more.hidden = !json.next_cursor;
      this.el.sessionsEmpty.hidden = this.el.sessionList.children.length > 0;
      this.markCurrentSession();
    } catch (err) { console.info("sessions:", err); }
  }

  sessionItem(s) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.session = s.id;
    b.textContent = s.title || "Conversation";
    const when = document.createElement("span");
    when.className = "when";
    when.textContent = `${new Date(s.updated_at).toLocaleString()} · ${s.message_count} messages`;
    b.append(when);
    b.addEventListener("click", () => {
      if (this.running) return;
      if (window.matchMedia("(max-width: 720px)").matches) this.toggleSessions(false);
      this.openSession(s.id);
    });
    li.append(b);
    return li;
  }

  markCurrentSession() {
    for (const b of this.el.sessionList.querySelectorAll("button")) {
      b.setAttribute("aria-current", String(b.dataset.session === this.sessionId));
    }
  }

  newChat() {
    if (this.running) this.stopRunning();
    this.sessionId = null;
    this.remember("session", null);
    this.clearThread();
    this.markCurrentSession();
    this.el.input.focus();
  }

  clearThread() {
    this.el.messages.replaceChildren();
    this.el.earlier.hidden = true;
    this.el.welcome.hidden = false;
    this.earlierCursor = null;
  }

  async openSession(id, { keepPending = false } = {}) {
    this.clearThread();
    this.sessionId = id;
    const { resp, json } = await this.call(`/v1/sessions/${id}/messages?limit=50`).catch(() => ({ resp: null }));
    if (!resp || !resp.ok) {
      // Gone (another user's storage, a deleted course): start fresh.
      console.info("session:", json);
      this.sessionId = null;
      this.remember("session", null);
      return;
    }
    this.remember("session", id);
    if (!keepPending) this.remember("pending", null);
    this.showMessages(json.items, false);
    this.earlierCursor = json.next_cursor;
    this.el.earlier.hidden = !json.next_cursor;
    this.markCurrentSession();
    this.stick = true;
    this.scrollDown();
  }

  async loadEarlier() {
    if (!this.earlierCursor || !this.sessionId) return;
    const { resp, json } = await this.call(
      `/v1/sessions/${this.sessionId}/messages?limit=50&cursor=${encodeURIComponent(this.earlierCursor)}`);
    if (!resp.ok) return;
    const thread = this.el.thread;
    const before = thread.scrollHeight;
    this.showMessages(json.items, true);
    thread.scrollTop += thread.scrollHeight - before; // keep the reader's place
    this.earlierCursor = json.next_cursor;
    this.el.earlier.hidden = !json.next_cursor;
  }

  /** Stored messages (newest first, as the API pages them) into the thread. */
  showMessages(items, prepend) {
    const views = [];
    let asked = null; // a stored answer's retry asks the question just before it
    for (const m of [...items].reverse()) {
      if (m.role === "user") {
        asked = m.content;
        views.push(this.userView(m.content, m.job_id));
      } else {
        views.push(this.assistantView(m.content, m.citations || [], { jobId: m.job_id, cached: m.cached, question: asked }));
        asked = null;
      }
    }
    if (prepend) this.el.messages.prepend(...views);
    else this.el.messages.append(...views);
    this.el.welcome.hidden = this.el.messages.children.length > 0;
  }

  // ------------------------------------------------------------ message views

  userView(text, jobId) {
    const view = document.createElement("div");
    view.className = "msg user";
    if (jobId) view.dataset.job = jobId;
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    bubble.textContent = text;
    view.append(bubble);
    return view;
  }

  /** An assistant message; ``text`` null shows the thinking state. */
  assistantView(text, citations, { jobId, cached, question }) {
    const view = document.createElement("div");
    view.className = "msg assistant";
    view.question = question;
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    const body = document.createElement("div");
    body.className = "answer";
    bubble.append(body);
    view.append(bubble);
    view.body = body;
    if (jobId) view.dataset.job = jobId;
    if (text === null) {
      view.setAttribute("aria-busy", "true");
      this.thinking(view, "Thinking…");
    } else {
      this.finish(view, text, citations, { cached });
    }
    return view;
  }

  thinking(view, words) {
    const t = document.createElement("div");
    t.className = "thinking";
    t.innerHTML = '<span class="dots" aria-hidden="true"><i></i><i></i><i></i></span>';
    t.append(words);
    view.body.replaceChildren(t);
  }

  /** Renders ``text`` into the view; ``citations`` null while it streams. */
  paint(view, text, citations) {
    view.raw = text;
    view.body.innerHTML = renderMarkdown(text);
    const known = new Map((citations || []).map((c) => [c.id, c]));
    for (const a of view.body.querySelectorAll("a.cite")) {
      const c = known.get(Number(a.dataset.cite));
      if (!c) {
        // Streaming, or a marker naming no listed source: plain text, not a dead link.
        const span = document.createElement("span");
        span.className = "cite";
        span.textContent = a.textContent;
        a.replaceWith(span);
      } else {
        a.title = c.heading_path && c.heading_path.length ? `${c.topic_title} › ${c.heading_path.at(-1)}` : c.topic_title;
        a.setAttribute("aria-label", `Source ${c.id}: ${a.title}`);
      }
    }
  }

  finish(view, text, citations, { cached = false } = {}) {
    view.removeAttribute("aria-busy");
    view.citations = citations || [];
    this.paint(view, text, view.citations);
    view.querySelector(".sources")?.remove();
    view.querySelector(".actions")?.remove();
    if (view.citations.length) {
      const list = document.createElement("ol");
      list.className = "sources";
      list.setAttribute("aria-label", "Sources");
      for (const c of view.citations) {
        const li = document.createElement("li");
        const a = document.createElement("a");
        a.href = "#";
        a.dataset.n = c.id;
        const n = Object.assign(document.createElement("span"), { className: "n", textContent: `[${c.id}]` });
        const topic = Object.assign(document.createElement("span"), { className: "topic", textContent: c.topic_title });
        a.append(n, topic);
        if (c.heading_path && c.heading_path.length) {
          a.append(Object.assign(document.createElement("span"), { className: "section", textContent: ` › ${c.heading_path.at(-1)}` }));
        }
        if (c.snippet) a.append(Object.assign(document.createElement("span"), { className: "snippet", textContent: c.snippet }));
        li.append(a);
        list.append(li);
      }
      view.querySelector(".bubble").append(list);
    }
    view.querySelector(".bubble").append(this.actions(view, cached));
  }

  actions(view, cached) {
    const bar = document.createElement("div");
    bar.className = "actions";
    const copy = Object.assign(document.createElement("button"), { type: "button", className: "copy", textContent: "Copy" });
    copy.addEventListener("click", async () => {
      await copyText(view.raw || "");
      copy.textContent = "Copied";
      setTimeout(() => { copy.textContent = "Copy"; }, 1500);
    });
    bar.append(copy);
    if (view.question) {
      const retry = Object.assign(document.createElement("button"), { type: "button", className: "retry", textContent: "Retry" });
      retry.addEventListener("click", () => this.ask(view.question));
      bar.append(retry);
    }
    if (cached) bar.append(Object.assign(document.createElement("span"), { className: "served", textContent: "from an earlier answer" }));
    return bar;
  }

  failed(view, error, question) {
    console.info("question failed:", error);
    this.say(learnerMessage(error));
    view.removeAttribute("aria-busy");
    view.classList.add("failed");
    const stopped = error.code === "cancelled";
    const p = Object.assign(document.createElement("p"), {
      className: stopped ? "note" : "error", textContent: learnerMessage(error) });
    if (stopped && view.raw) {
      this.paint(view, view.raw, null); // keep what had come, say it stopped
      view.querySelector(".bubble").append(p);
    } else {
      view.body.replaceChildren(p);
    }
    if (question !== undefined && question !== null && !NO_RETRY.has(error.code)) {
      const retry = Object.assign(document.createElement("button"), {
        type: "button", className: "retry", textContent: "Try again" });
      retry.addEventListener("click", () => { view.remove(); this.ask(question); });
      const bar = document.createElement("div");
      bar.className = "actions";
      bar.append(retry);
      view.querySelector(".bubble").append(bar);
    }
  }

  /** Tells a screen reader, once, what came: the finished answer or the failure (the
   * tokens themselves are not announced one by one, and the message is aria-busy). */
  say(text) {
    this.el.announce.textContent = "";
    requestAnimationFrame(() => { this.el.announce.textContent = text; });
  }

  scrollDown() {
    if (this.stick) this.el.thread.scrollTop = this.el.thread.scrollHeight;
    else this.el.jump.hidden = false;
  }

  // ------------------------------------------------------------ asking

  submit() {
    const question = this.el.input.value.trim();
    if (!question || this.running || !this.courseKey) return;
    this.el.input.value = "";
    this.grow();
    this.ask(question);
  }

  setRunning(running) {
    this.running = running;
    this.el.stop.hidden = !running;
    this.el.send.disabled = Boolean(running);
    this.el.course.disabled = Boolean(running);
  }

  async ask(question) {
    if (this.running) return;
    this.el.welcome.hidden = true;
    const userView = this.userView(question);
    const view = this.assistantView(null, [], { question });
    this.el.messages.append(userView, view);
    this.stick = true;
    this.scrollDown();
    const run = { view, jobId: null, abort: new AbortController() };
    this.setRunning(run);
    let accepted;
    try {
      const { resp, json } = await this.call(`/v1/courses/${encodeURIComponent(this.courseKey)}/questions`, {
        method: "POST",
        headers: { "Idempotency-Key": crypto.randomUUID() },
        body: this.sessionId ? { question, session_id: this.sessionId } : { question },
      });
      if (!resp.ok) {
        this.setRunning(null);
        this.failed(view, (json && json.error) || { code: "service_unavailable" }, question);
        return;
      }
      accepted = json;
    } catch (err) {
      this.setRunning(null);
      this.failed(view, { code: "service_unavailable", message: String(err) }, question);
      return;
    }
    run.jobId = accepted.job_id;
    view.dataset.job = userView.dataset.job = accepted.job_id;
    this.sessionId = accepted.session_id;
    this.remember("session", accepted.session_id);
    this.remember("pending", { job_id: accepted.job_id, session_id: accepted.session_id, question, events_url: accepted.events_url });
    this.markCurrentSession();
    await this.stream(run, accepted.events_url, question);
    if (!this.el.sessionList.querySelector(`[data-session="${accepted.session_id}"]`)) this.loadSessions(true);
  }

  /** A question that was in flight when the page was reloaded: follow it again. */
  async resume(pending) {
    if (this.el.messages.querySelector(`.assistant[data-job="${pending.job_id}"]`)) {
      this.remember("pending", null); // answered: its messages are in the session
      return;
    }
    const { resp, json } = await this.call(`/v1/jobs/${pending.job_id}`).catch(() => ({ resp: null }));
    if (!resp || !resp.ok) { this.remember("pending", null); return; }
    this.el.welcome.hidden = true;
    const view = this.assistantView(null, [], { question: pending.question, jobId: pending.job_id });
    this.el.messages.append(this.userView(pending.question, pending.job_id), view);
    const run = { view, jobId: pending.job_id, abort: new AbortController() };
    this.setRunning(run);
    await this.stream(run, json.events_url, pending.question);
  }

  async stream(run, url, question) {
    const view = run.view;
    let text = "";
    let frame = 0;
    const paintSoon = () => {
      // One render per frame, however many tokens arrive in it.
      if (frame) return;
      frame = requestAnimationFrame(() => { frame = 0; this.paint(view, text, null); this.scrollDown(); });
    };
    await this.follow(run, url, (event, data) => {
      if (event === "status") {
        if (!text && STATUS_WORDS[data.status]) this.thinking(view, STATUS_WORDS[data.status]);
      } else if (event === "token") {
        text += data.text;
        paintSoon();
      } else if (event === "reset") {
        text = ""; // the job restarted on another worker
        this.thinking(view, "Thinking…");
      } else if (event === "done") {
        cancelAnimationFrame(frame);
        frame = 0;
        if (text && text !== data.answer) console.warn("streamed text differs from the stored answer");
        this.finish(view, data.answer, data.citations, { cached: data.cached });
        this.scrollDown();
        this.say(`Answer: ${view.body.textContent.trim()}`);
        return true;
      } else if (event === "error") {
        cancelAnimationFrame(frame);
        frame = 0;
        view.raw = text;
        this.failed(view, data, question);
        return true;
      }
      return false;
    });
    this.remember("pending", null);
    if (this.running === run) this.setRunning(null);
  }

  async stopRunning() {
    const run = this.running;
    if (!run || !run.jobId) return;
    this.el.stop.disabled = true;
    try {
      // The stream then ends with its "cancelled" error event.
      const { resp } = await this.call(`/v1/jobs/${run.jobId}`, { method: "DELETE" });
      if (!resp.ok) run.abort.abort();
    } catch { run.abort.abort(); }
    this.el.stop.disabled = false;
  }

  // Reads the job's event stream with fetch (EventSource gives up for good on an HTTP
  // error, and cannot send a bearer token), reconnecting from the last event id after
  // a dropped connection, a 5xx or 429, or a retryable error event; on 401 (the stream
  // token in the URL expired) it asks the job for a fresh events_url. Gives up after 10
  // failures in a row, and says so.
  async follow(run, url, onEvent) {
    let lastId = null, failures = 0, wait = 1000;
    while (failures < 10) {
      if (run.abort.signal.aborted) { onEvent("error", { code: "cancelled", message: "stopped" }); return; }
      try {
        const headers = await this.headers(lastId ? { "Last-Event-ID": lastId } : {});
        const resp = await fetch(this.api + url, { headers, signal: run.abort.signal });
        if (resp.status === 401 || resp.status === 403) {
          const { resp: jr, json } = await this.call(`/v1/jobs/${run.jobId}`);
          if (!jr.ok) { onEvent("error", { code: "service_unavailable", message: `HTTP ${jr.status}` }); return; }
          url = json.events_url; failures++; continue;
        }
        if (resp.status === 429 || resp.status >= 500) {
          failures++; wait = 1000 * (Number(resp.headers.get("Retry-After")) || 1);
        } else if (!resp.ok) {
          onEvent("error", { code: "service_unavailable", message: `HTTP ${resp.status}` }); return;
        } else {
          const reader = resp.body.getReader();
          const dec = new TextDecoder();
          let buf = "";
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            buf += dec.decode(value, { stream: true }).replace(/\r\n/g, "\n");
            let cut;
            while ((cut = buf.indexOf("\n\n")) >= 0) {
              const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
              let event = "message", id = null;
              const data = [];
              for (const line of block.split("\n")) {
                if (line.startsWith("event:")) event = line.slice(6).trim();
                else if (line.startsWith("data:")) data.push(line.slice(5).trim());
                else if (line.startsWith("id:")) id = line.slice(3).trim();
                else if (line.startsWith("retry:")) wait = Number(line.slice(6)) || wait;
              }
              if (id) lastId = id;
              if (!data.length) continue;
              failures = 0;
              const payload = JSON.parse(data.join("\n"));
              if (event === "error" && payload.retryable && !id) break; // the stream failed, not the job
              if (onEvent(event, payload)) return;
            }
          }
          failures++;
        }
      } catch { failures++; /* dropped: reconnect below */ }
      await new Promise((r) => setTimeout(r, wait));
    }
    onEvent("error", { code: "service_unavailable", message: "connection lost after 10 tries" });
  }

  // ------------------------------------------------------------ the course text

  async openTopic(citation, from) {
    const el = this.el;
    this.readerFrom = from;
    el.readerTitle.textContent = citation.topic_title;
    el.readerModule.textContent = "";
    el.readerBody.replaceChildren(Object.assign(document.createElement("p"), { className: "note", textContent: "Opening…" }));
    el.reader.hidden = false;
    el.reader.dataset.topic = citation.topic_key;
    el.reader.dataset.anchor = citation.anchor || "";
    const path = `/v1/courses/${encodeURIComponent(this.courseKey)}/topics/${encodeURIComponent(citation.topic_key)}`;
    const { resp, json } = await this.call(path).catch(() => ({ resp: null, json: null }));
    if (!resp || !resp.ok) {
      el.readerBody.replaceChildren(Object.assign(document.createElement("p"), {
        className: "error", textContent: (json && json.error && json.error.message) || "This section can't be opened right now." }));
      el.reader.focus();
      return;
    }
    el.readerTitle.textContent = json.title;
    el.readerModule.textContent = json.module_title || "";
    el.readerBody.innerHTML = DOMPurify.sanitize(json.html, PURIFY_TOPIC);
    const target = citation.anchor
      ? [...el.readerBody.querySelectorAll("[data-anchor]")].find((h) => h.dataset.anchor === citation.anchor)
      : null;
    if (target) {
      target.classList.add("target");
      target.setAttribute("tabindex", "-1");
      target.scrollIntoView({ block: "start" });
      target.focus({ preventScroll: true });
    } else {
      el.readerBody.scrollTop = 0;
      el.reader.focus();
    }
    el.reader.dataset.opened = "true";
  }

  closeReader() {
    if (this.el.reader.hidden) return;
    this.el.reader.hidden = true;
    delete this.el.reader.dataset.opened;
    this.readerFrom?.focus();
  }
}

/** Copies text; the Clipboard API where the page may use it, else a hidden textarea. */
async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return;
  } catch { /* not a secure context, or no permission */ }
  const area = Object.assign(document.createElement("textarea"), { value: text });
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.append(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}

if (!customElements.get("course-assistant")) customElements.define("course-assistant", CourseAssistant);
