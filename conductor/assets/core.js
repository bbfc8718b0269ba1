// Shared by every view: the dashboard state, DOM helpers (textContent only),
// the API client, number formatting, polling, toasts.

const POLL_MS = 2000; // every live view refreshes at this period
const SVG_NS = 'http://www.w3.org/2000/svg';

export const st = {
  authed: false,
  pollGen: 0,
  timer: 0,
  inflight: Promise.resolve(),
  skew: 0, // conductor clock minus browser clock, ms
  filter: { q: '', status: '', label: '' },
  spark: new Map(), // worker id -> { pts: [{t, v}], loaded }
  cards: new Map(), // worker id -> card element
  labelOpts: '',
  worker: null, // state of the worker page
  svcList: null, // state of the services page
  svc: null, // state of the service page
  alerts: null, // state of the alerts page
  agents: null, // state of the agents page
  log: null, // the open log panel's stream
  prefill: null, // spec copied into the new-service form ("New version…")
};

// ---------- DOM helpers (textContent only: nothing is parsed as HTML) ----------
export const $ = (sel, root) => (root || document).querySelector(sel);
export function attrs(el, a) {
  for (const [k, v] of Object.entries(a || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'text') el.textContent = v;
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  return el;
}
export function add(el, kids) {
  for (const k of kids.flat()) {
    if (k !== null && k !== undefined && k !== false) el.append(k instanceof Node ? k : String(k));
  }
  return el;
}
export const h = (tag, a, ...kids) => add(attrs(document.createElement(tag), a), kids);
export const svg = (tag, a, ...kids) => add(attrs(document.createElementNS(SVG_NS, tag), a), kids);
export const setText = (el, t) => { if (el && el.textContent !== t) el.textContent = t; };
export const enc = encodeURIComponent;

// ---------- API ----------
export class AuthError extends Error {}
export async function api(method, path, body) {
  const init = { method, credentials: 'same-origin', headers: { Accept: 'application/json' } };
  if (body instanceof Blob) init.body = body; // a file upload, sent raw
  else if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const r = await fetch('/api/v1' + path, init);
  if (r.status === 401) {
    signedOut('Your session ended. Sign in again.');
    throw new AuthError('signed out');
  }
  const text = await r.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch (_) { data = { error: text }; }
  }
  if (!r.ok) {
    const e = new Error((data && data.error) || 'HTTP ' + r.status);
    e.status = r.status;
    throw e;
  }
  if (data && typeof data.now_ms === 'number') st.skew = data.now_ms - Date.now();
  return data;
}
export const now = () => Date.now() + st.skew;

// ---------- formatting ----------
export const dash = '–';
export const ok = (v) => v !== null && v !== undefined && Number.isFinite(v);
export const fmt = {
  pct: (v) => (ok(v) ? (v >= 10 || v === 0 ? v.toFixed(0) : v.toFixed(1)) + '%' : dash),
  bytes(v) {
    if (!ok(v)) return dash;
    const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
    return (i && v < 10 ? v.toFixed(1) : v.toFixed(0)) + ' ' + u[i];
  },
  rate: (v) => (ok(v) ? fmt.bytes(v) + '/s' : dash),
  temp: (v) => (ok(v) ? v.toFixed(1) + ' °C' : dash),
  ago(ms) {
    if (!ok(ms)) return 'never';
    const s = Math.max(0, Math.round((now() - ms) / 1000));
    if (s < 60) return s + ' s ago';
    if (s < 3600) return Math.floor(s / 60) + ' min ago';
    if (s < 86400) return Math.floor(s / 3600) + ' h ago';
    return Math.floor(s / 86400) + ' d ago';
  },
  dur(s) {
    if (!ok(s)) return dash;
    const d = Math.floor(s / 86400), hr = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    return d ? `${d} d ${hr} h` : hr ? `${hr} h ${m} min` : `${m} min`;
  },
  time: (ms) => (ok(ms) ? new Date(ms).toLocaleString() : dash),
};
const sum = (arr, f) => (arr || []).reduce((a, x) => a + f(x), 0);

// One sample, whatever its source, as plain numbers.
function fromRaw(m) {
  const dt = sum(m.disks, (d) => d.total), du = sum(m.disks, (d) => d.used);
  const temps = (m.temperatures || []).map((t) => t.millicelsius / 1000);
  return {
    cpu: m.cpu_total / 100,
    cores: (m.cpu_per_core || []).map((c) => c / 100),
    mem: m.memory_total ? (100 * m.memory_used) / m.memory_total : null,
    memUsed: m.memory_used, memTotal: m.memory_total,
    disk: dt ? (100 * du) / dt : null, diskUsed: du, diskTotal: dt,
    rx: sum(m.net, (n) => n.rx_bps), tx: sum(m.net, (n) => n.tx_bps),
    temp: temps.length ? Math.max(...temps) : null,
  };
}
export function fromMinute(r) {
  return {
    cpu: r.cpu_avg_percent, cpuMax: r.cpu_max_percent, cores: null,
    mem: r.mem_total ? (100 * r.mem_used_avg) / r.mem_total : null,
    memUsed: r.mem_used_avg, memTotal: r.mem_total,
    disk: r.disk_total ? (100 * r.disk_used) / r.disk_total : null,
    diskUsed: r.disk_used, diskTotal: r.disk_total,
    rx: r.rx_bps_avg, tx: r.tx_bps_avg, temp: r.temp_max_celsius,
  };
}
export function fromSummary(s) {
  return {
    cpu: s.cpu_percent,
    mem: s.memory_total ? (100 * s.memory_used) / s.memory_total : null,
    memUsed: s.memory_used, memTotal: s.memory_total,
    disk: s.disk_total ? (100 * s.disk_used) / s.disk_total : null,
    diskUsed: s.disk_used, diskTotal: s.disk_total,
    temp: s.temp_max_celsius,
  };
}
export const rawPoint = (p) => ({ t: p.received_at_ms, v: fromRaw(p.metrics) });

export function setBadge(el, w) {
  const s = w.revoked ? 'revoked' : w.status || 'offline';
  el.className = 'badge ' + s;
  setText(el, s);
}

// ---------- polling ----------
export function stopPolling() {
  st.pollGen++;
  clearTimeout(st.timer);
}
export function startPolling(fn) {
  stopPolling();
  const gen = st.pollGen;
  const tick = async () => {
    if (gen !== st.pollGen || !st.authed) return;
    const started = Date.now();
    if (!document.hidden) {
      let done;
      st.inflight = new Promise((r) => { done = r; });
      try {
        await fn();
        setConn('');
      } catch (e) {
        if (!(e instanceof AuthError)) setConn('Connection problem (' + e.message + '), retrying…');
      } finally {
        done();
      }
    }
    if (gen === st.pollGen && st.authed) {
      st.timer = setTimeout(tick, Math.max(0, POLL_MS - (Date.now() - started)));
    }
  };
  tick();
}
const setConn = (t) => setText($('#conn'), t);

let toastTimer = 0;
export function toast(text) {
  const t = $('#toast');
  t.textContent = text;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, 2500);
}
export async function copy(text) {
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
    } else {
      const ta = h('textarea', { readonly: true, class: 'offscreen' });
      ta.value = text;
      document.body.append(ta);
      ta.select();
      document.execCommand('copy');
      ta.remove();
    }
    toast('Copied');
  } catch (_) {
    toast('Copy failed: select the text and copy it by hand');
  }
}

// What a 401 does; the login module sets it (back to the sign-in form).
let onSignedOut = () => {};
export const setSignedOutHandler = (fn) => { onSignedOut = fn; };
export const signedOut = (message) => onSignedOut(message);

// After a navigation, focus moves to the new page's heading (screen readers
// announce it; Tab continues from there).
export function focusHeading(view) {
  const h1 = $('h1', view);
  if (h1) {
    h1.setAttribute('tabindex', '-1');
    h1.focus({ preventScroll: true });
  }
}

// Puts `el` at position `i` of `parent`, moving it only when it is elsewhere
// (moving a node takes the keyboard focus away from inside it).
export function place(parent, el, i) {
  const at = parent.children[i];
  if (at !== el) parent.insertBefore(el, at || null);
}
export const kv = (rows) => rows.filter(Boolean).flatMap(([k, v, cls]) =>
  [h('dt', { text: k }), h('dd', { class: cls || null, text: v === undefined || v === null || v === '' ? dash : String(v) })]);
// ---------- tables of a polled page (alerts, agents) ----------
// A hidden table with its head and an empty body `<id>-rows`.
export const table = (id, cols) => h('table', { class: 'svc-table', id, hidden: true },
  h('thead', {}, h('tr', {}, cols.map((t) => h('th', { text: t })))), h('tbody', { id: id + '-rows' }));
export const td = (label, t, col) => h('td', { 'data-label': label, 'data-col': col || null, text: t === undefined || t === null || t === '' ? dash : String(t) });
// A catch handler showing an API error (not a sign-out) in `sel`.
export const showError = (sel, prefix) => (e) => { if (!(e instanceof AuthError)) setText($(sel), prefix + e.message); };
// Redraws the rows of table `id` (page state `s.keys` remembers what is
// drawn) when `key` changed; hides an empty table and says `empty`.
export function rows(s, id, key, list, row, empty) {
  if (s.keys[id] === key) return;
  s.keys[id] = key;
  $('#' + id + '-rows').replaceChildren(...list.map(row));
  $('#' + id).hidden = !list.length;
  setText($('#' + id + '-empty'), list.length ? '' : empty);
}

export function setKv(el, rows) {
  const key = JSON.stringify(rows);
  if (el.dataset.key !== key) { el.dataset.key = key; el.replaceChildren(...kv(rows)); }
}
