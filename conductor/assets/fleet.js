// The fleet page (#/): one card per worker with sparklines, filters.
import { $, add, api, AuthError, dash, enc, fmt, focusHeading, fromSummary, h, ok, rawPoint, setBadge, setText, st, startPolling, svg } from './core.js';

const SPARK_POINTS = 60; // fleet sparklines: newest samples kept
const SPARK_SPAN_MS = 5 * 60000; // history loaded for a sparkline

// ---------- sparklines ----------
function spark(label) {
  return svg('svg', { class: 'spark', viewBox: '0 0 100 22', preserveAspectRatio: 'none', 'aria-hidden': 'true', 'data-spark': label },
    svg('polyline', { 'vector-effect': 'non-scaling-stroke', points: '' }));
}
function drawSpark(el, pts, key, fixed) {
  const vals = pts.filter((p) => ok(p.v[key]));
  const line = el.firstChild;
  el.setAttribute('data-points', String(vals.length));
  if (vals.length < 2) { line.setAttribute('points', ''); return; }
  let lo = 0, hi = 100;
  if (!fixed) {
    lo = Math.min(...vals.map((p) => p.v[key]));
    hi = Math.max(...vals.map((p) => p.v[key]));
    const pad = Math.max(1, (hi - lo) * 0.2);
    lo -= pad; hi += pad;
  }
  const t0 = vals[0].t, span = Math.max(1, vals[vals.length - 1].t - t0);
  line.setAttribute('points', vals.map((p) => {
    const y = 21 - ((Math.min(hi, Math.max(lo, p.v[key])) - lo) / (hi - lo)) * 20;
    return ((100 * (p.t - t0)) / span).toFixed(2) + ',' + y.toFixed(2);
  }).join(' '));
}

// ---------- fleet ----------
const GAUGES = [
  ['cpu', 'CPU', true, (v) => fmt.pct(v.cpu)],
  ['mem', 'Mem', true, (v) => fmt.pct(v.mem) + (ok(v.memTotal) ? ' of ' + fmt.bytes(v.memTotal) : '')],
  ['disk', 'Disk', true, (v) => fmt.pct(v.disk) + (ok(v.diskTotal) ? ' of ' + fmt.bytes(v.diskTotal) : '')],
  ['temp', 'Temp', false, (v) => fmt.temp(v.temp)],
];

export function fleetView(view) {
  const f = st.filter;
  const field = (id, label, input) => h('div', { class: id === 'f-q' ? 'field wide' : 'field' }, h('label', { for: id, text: label }), input);
  const q = h('input', { id: 'f-q', type: 'search', placeholder: 'hostname or id', autocomplete: 'off' });
  q.value = f.q;
  const status = h('select', { id: 'f-status' },
    ['', 'online', 'stale', 'offline'].map((s) => h('option', { value: s, text: s || 'All' })));
  status.value = f.status;
  const label = h('select', { id: 'f-label' }, h('option', { value: '', text: 'All labels' }));
  st.labelOpts = '';
  const refilter = () => {
    f.q = q.value.trim().toLowerCase();
    f.status = status.value;
    f.label = label.value;
    if (st.fleetData) renderFleet(st.fleetData);
  };
  q.addEventListener('input', refilter);
  status.addEventListener('change', refilter);
  label.addEventListener('change', refilter);
  add(view, [
    h('div', { class: 'summary' },
      h('h1', { text: 'Fleet' }),
      h('span', {}, h('span', { class: 'count', id: 'count-online', text: '0' }), ' online'),
      h('span', {}, h('span', { class: 'count', id: 'count-stale', text: '0' }), ' stale'),
      h('span', {}, h('span', { class: 'count', id: 'count-offline', text: '0' }), ' offline'),
      h('span', { class: 'muted' }, h('span', { id: 'count-total', text: '0' }), ' workers')),
    h('div', { class: 'toolbar', role: 'search' },
      field('f-q', 'Search', q), field('f-status', 'Status', status), field('f-label', 'Label', label)),
    h('p', { id: 'fleet-empty', class: 'empty', hidden: true }),
    h('ul', { id: 'cards', class: 'cards', 'aria-label': 'Workers' }),
  ]);
  document.title = 'Fleet · aerekos';
  focusHeading(view);
  st.fleetData = null;
  startPolling(pollFleet);
}

async function pollFleet() {
  const data = await api('GET', '/workers');
  const workers = (data.workers || []).sort((a, b) =>
    a.hostname.localeCompare(b.hostname, undefined, { numeric: true }) || a.id.localeCompare(b.id));
  await Promise.all(workers.map(loadSpark));
  for (const w of workers) {
    const sp = st.spark.get(w.id);
    if (w.summary && sp) {
      const last = sp.pts.length ? sp.pts[sp.pts.length - 1].t : -1;
      if (w.summary.received_at_ms > last) {
        sp.pts.push({ t: w.summary.received_at_ms, v: fromSummary(w.summary) });
        if (sp.pts.length > SPARK_POINTS) sp.pts.splice(0, sp.pts.length - SPARK_POINTS);
      }
    }
  }
  st.fleetData = workers;
  if ($('#cards')) renderFleet(workers);
}

async function loadSpark(w) {
  if (st.spark.has(w.id)) return;
  const anchor = (w.summary && w.summary.received_at_ms) || w.last_seen_ms;
  const sp = { pts: [] };
  if (anchor) {
    try {
      const r = await api('GET', `/workers/${enc(w.id)}/metrics?resolution=raw&from=${Math.max(0, anchor - SPARK_SPAN_MS)}&to=${anchor}&max_points=${SPARK_POINTS}`);
      sp.pts = (r.points || []).map(rawPoint);
    } catch (e) {
      if (e instanceof AuthError) throw e; // else: no history, the sparkline fills from polling
    }
  }
  st.spark.set(w.id, sp);
}

function renderFleet(workers) {
  const f = st.filter;
  const count = (s) => workers.filter((w) => !w.revoked && w.status === s).length;
  setText($('#count-online'), String(count('online')));
  setText($('#count-stale'), String(count('stale')));
  setText($('#count-offline'), String(count('offline')));
  setText($('#count-total'), String(workers.length));

  const labels = [...new Set(workers.flatMap((w) => Object.entries(w.labels || {}).map(([k, v]) => k + '=' + v)))].sort();
  const key = labels.join('\n');
  const sel = $('#f-label');
  if (sel && key !== st.labelOpts) {
    st.labelOpts = key;
    sel.replaceChildren(h('option', { value: '', text: 'All labels' }), ...labels.map((l) => h('option', { value: l, text: l })));
    sel.value = labels.includes(f.label) ? f.label : '';
    f.label = sel.value;
  }

  const list = $('#cards');
  const seen = new Set();
  let shown = 0;
  for (const w of workers) {
    seen.add(w.id);
    let card = st.cards.get(w.id);
    if (!card) {
      card = workerCard(w);
      st.cards.set(w.id, card);
    }
    list.append(card); // keeps the sorted order (moves, never re-creates)
    updateCard(card, w);
    const lab = Object.entries(w.labels || {}).map(([k, v]) => k + '=' + v);
    const match = (!f.q || w.hostname.toLowerCase().includes(f.q) || w.id.toLowerCase().includes(f.q)) &&
      (!f.status || (!w.revoked && w.status === f.status)) && (!f.label || lab.includes(f.label));
    card.hidden = !match;
    if (match) shown++;
  }
  for (const [id, card] of st.cards) {
    if (!seen.has(id)) { card.remove(); st.cards.delete(id); st.spark.delete(id); }
  }
  const empty = $('#fleet-empty');
  empty.replaceChildren();
  if (!workers.length) {
    add(empty, ['No workers yet. Enrol a Pi with the registration token from ', h('a', { href: '#/settings', text: 'Settings' }), '.']);
  } else if (!shown) {
    empty.textContent = 'No worker matches the filter.';
  }
  empty.hidden = shown > 0;
}

function workerCard(w) {
  const gauges = h('div', { class: 'gauges' });
  for (const [k, name] of GAUGES) {
    add(gauges, [h('span', { class: 'k', text: name }), spark(k), h('span', { class: 'v', 'data-v': k })]);
  }
  return h('li', { class: 'card', 'data-id': w.id },
    h('div', { class: 'card-head' },
      h('a', { href: '#/workers/' + enc(w.id), class: 'name' }), h('span', { class: 'badge' }),
      h('span', { class: 'badge power', hidden: true })),
    h('div', { class: 'meta' }),
    h('ul', { class: 'chips', 'aria-label': 'Labels' }),
    gauges);
}

// A Pi whose supply sags or whose firmware throttles it: what is happening
// now, else what happened since boot (the board frame's named bits).
export function powerText(board) {
  const f = (board && board.flags) || [];
  if (f.includes('under_voltage_now')) return 'under-voltage';
  if (f.some((x) => x.endsWith('_now'))) return 'throttled';
  if (f.includes('under_voltage_since_boot')) return 'under-voltage since boot';
  if (f.length) return 'throttled since boot';
  return '';
}
function setPower(el, board) {
  const t = powerText(board);
  setText(el, t);
  el.hidden = !t;
  el.className = 'badge power ' + (t.endsWith('since boot') ? 'stale' : 'offline');
  el.title = t ? 'Raspberry Pi firmware: ' + ((board && board.flags) || []).join(', ') : '';
}

function updateCard(card, w) {
  card.dataset.status = w.revoked ? 'revoked' : w.status;
  setText($('.name', card), w.hostname);
  setBadge($('.badge', card), w);
  setPower($('.power', card), w.board);
  const meta = [w.device_model || 'unknown model', w.arch || '?', 'seen ' + fmt.ago(w.last_seen_ms)].join(' · ');
  setText($('.meta', card), meta);
  const labels = Object.entries(w.labels || {}).map(([k, v]) => k + '=' + v);
  const chips = $('.chips', card);
  if (chips.dataset.key !== labels.join('\n')) {
    chips.dataset.key = labels.join('\n');
    chips.replaceChildren(...labels.map((l) => h('li', { class: 'chip', text: l })));
  }
  const sp = st.spark.get(w.id) || { pts: [] };
  const latest = w.summary ? fromSummary(w.summary) : {};
  for (const [k, , fixed, show] of GAUGES) {
    drawSpark($(`[data-spark=${k}]`, card), sp.pts, k, fixed);
    setText($(`[data-v=${k}]`, card), w.summary ? show(latest) : dash);
  }
}
