// One worker's page (#/workers/<id>): charts, inventory, labels, actions,
// a shell panel (terminal.js), its services.
import { $, add, api, AuthError, dash, enc, fmt, focusHeading, fromMinute, h, now, ok, rawPoint, setBadge, setText, st, startPolling, stopPolling, svg } from './core.js';
import { logPanel, openLog } from './logs.js';
import { stateBadge } from './services.js';
import { Shell } from './terminal.js';

const CHART_POINTS = 300; // points drawn per chart series
const W = 600, H = 130; // chart viewBox
const RANGES = {
  live: { label: 'Live 5 min', ms: 5 * 60000, res: 'raw', x0: '−5 min' },
  h1: { label: '1 h', ms: 3600000, res: 'raw', x0: '−1 h' },
  h24: { label: '24 h', ms: 86400000, res: 'minute', x0: '−24 h' },
  d7: { label: '7 d', ms: 7 * 86400000, res: 'minute', x0: '−7 d' },
};

// ---------- charts ----------
// Smallest 1, 2 or 5 × 10^k (× 1024^j with `binary`) at or above x.
function niceMax(x, binary) {
  if (!(x > 0)) return 1;
  const unit = binary ? Math.pow(1024, Math.floor(Math.log(x) / Math.log(1024))) : 1;
  const v = x / unit, p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p * unit;
  return 10 * p * unit;
}
const CHARTS = [
  { id: 'cpu', title: 'CPU', lo: 0, hi: 100, fmt: fmt.pct, legend: true,
    series: (minute) => (minute ? ['average', 'max'] : ['total']),
    get: (v, i) => (i ? v.cpuMax : v.cpu) },
  { id: 'cores', title: 'CPU per core', lo: 0, hi: 100, fmt: fmt.pct, legend: true,
    series: (minute, last) => (minute || !last ? [] : last.cores.map((_, i) => 'core ' + i)),
    get: (v, i) => (v.cores ? v.cores[i] : null),
    empty: (minute) => (minute ? 'Per-core history is kept at raw resolution only (live and 1 h).' : 'No per-core data.') },
  { id: 'mem', title: 'Memory', lo: 0, hi: 100, fmt: fmt.pct, series: () => ['used'], get: (v) => v.mem,
    label: (v) => fmt.pct(v.mem) + ' · ' + fmt.bytes(v.memUsed) + ' of ' + fmt.bytes(v.memTotal) },
  { id: 'disk', title: 'Disk', lo: 0, hi: 100, fmt: fmt.pct, series: () => ['used'], get: (v) => v.disk,
    label: (v) => fmt.pct(v.disk) + ' · ' + fmt.bytes(v.diskUsed) + ' of ' + fmt.bytes(v.diskTotal) },
  { id: 'net', title: 'Network', lo: 0, binary: true, fmt: fmt.rate, legend: true, series: () => ['rx', 'tx'],
    get: (v, i) => (i ? v.tx : v.rx) },
  { id: 'temp', title: 'Temperature', fmt: fmt.temp, series: () => ['max'], get: (v) => v.temp,
    empty: () => 'No temperature sensor reported.' },
];

function chartFigure(def) {
  const plot = svg('svg', { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'none', role: 'img', 'aria-label': def.title });
  for (const y of [0.25, 0.5, 0.75]) {
    plot.append(svg('line', { class: 'grid', x1: 0, x2: W, y1: H * y, y2: H * y, 'vector-effect': 'non-scaling-stroke' }));
  }
  return h('figure', { class: 'chart', 'data-chart': def.id, 'data-points': '0' },
    h('figcaption', {}, h('span', { text: def.title }), h('span', { class: 'val' })),
    h('div', { class: 'plot' }, plot, h('span', { class: 'ymax' }), h('span', { class: 'ymin' })),
    h('div', { class: 'xaxis' }, h('span', { class: 'x0' }), h('span', { text: 'now' })),
    h('p', { class: 'muted small chart-empty', hidden: true }),
    h('ul', { class: 'legend' }));
}

// Even-stride thinning that keeps the newest point.
function thin(pts, n) {
  if (pts.length <= n) return pts;
  const stride = Math.ceil(pts.length / n), off = (pts.length - 1) % stride;
  return pts.filter((_, i) => i >= off && (i - off) % stride === 0);
}

function drawChart(fig, def, pts, range, minute) {
  const t1 = now(), t0 = t1 - range.ms;
  const shown = thin(pts.filter((p) => p.t >= t0), CHART_POINTS);
  const last = shown.length ? shown[shown.length - 1].v : null;
  const names = def.series(minute, last);
  const plot = $('svg', fig);
  // A gap wider than 3 typical steps is drawn as a break (worker was away).
  const steps = shown.slice(1).map((p, i) => p.t - shown[i].t).sort((a, b) => a - b);
  const gap = Math.max(3 * (steps[Math.floor(steps.length / 2)] || 0), 1500);
  const cols = names.map((_, i) => shown.map((p) => [p.t, def.get(p.v, i)]).filter((p) => ok(p[1])));
  let lo = def.lo, hi = def.hi;
  const all = cols.flat().map((p) => p[1]);
  if (hi === undefined) {
    const mx = all.length ? Math.max(...all) : 1;
    if (lo === undefined) {
      const mn = all.length ? Math.min(...all) : 0;
      lo = Math.floor(mn - 2);
      hi = Math.ceil(mx + 2);
    } else {
      hi = niceMax(mx, def.binary);
    }
  }
  const x = (t) => (((t - t0) / (t1 - t0)) * W).toFixed(1);
  const y = (v) => (H - ((Math.min(hi, Math.max(lo, v)) - lo) / (hi - lo || 1)) * H).toFixed(1);
  const paths = [...plot.querySelectorAll('path')];
  cols.forEach((col, i) => {
    let p = paths[i];
    if (!p) {
      p = svg('path', { class: 'line s' + (i % 8), 'vector-effect': 'non-scaling-stroke' });
      plot.append(p);
    }
    let d = '', prev = null;
    for (const [t, v] of col) {
      d += (prev === null || t - prev > gap ? 'M' : 'L') + x(t) + ' ' + y(v);
      prev = t;
    }
    p.setAttribute('d', d);
  });
  paths.slice(cols.length).forEach((p) => p.remove());

  const has = cols.some((c) => c.length);
  const emptyMsg = $('.chart-empty', fig);
  const noData = !names.length || (!has && def.empty && shown.length);
  emptyMsg.hidden = !noData;
  setText(emptyMsg, noData ? (def.empty ? def.empty(minute) : 'No data.') : '');
  $('.plot', fig).hidden = !!noData;
  $('.xaxis', fig).hidden = !!noData;
  setText($('.ymax', fig), def.fmt(hi));
  setText($('.ymin', fig), def.fmt(lo));
  setText($('.x0', fig), range.x0);
  const val = !last ? dash : def.label ? def.label(last) : names.length === 1 ? def.fmt(def.get(last, 0)) : '';
  setText($('.val', fig), val);
  const legend = $('.legend', fig);
  const many = def.legend && last && names.length > 1;
  const lkey = many ? names.map((n, i) => n + def.fmt(def.get(last, i))).join() : '';
  if (legend.dataset.key !== lkey) {
    legend.dataset.key = lkey;
    legend.replaceChildren(...(many ? names.map((n, i) =>
      h('li', { class: 's' + (i % 8) }, h('span', { text: n + ' ' + def.fmt(def.get(last, i)) }))) : []));
  }
  plot.setAttribute('aria-label', `${def.title}, ${range.label}: ${val || names.map((n, i) => n + ' ' + (last ? def.fmt(def.get(last, i)) : dash)).join(', ')}`);
  fig.dataset.points = String(shown.length);
  fig.dataset.last = shown.length ? String(shown[shown.length - 1].t) : '';
}

// ---------- worker page ----------
export function workerView(view, id) {
  const w = { id, range: 'live', pts: [], lastT: null, fetchedAt: 0, gen: 0, labelsKey: null, eventsKey: null, servicesKey: null, detail: null };
  st.worker = w;
  const rangeButtons = Object.entries(RANGES).map(([k, r]) =>
    h('button', { type: 'button', 'data-range': k, 'aria-pressed': String(k === w.range), text: r.label,
      onclick: () => setRange(k) }));
  const labelKey = h('input', { id: 'label-key', name: 'key', autocomplete: 'off', maxlength: 32, required: true });
  const labelVal = h('input', { id: 'label-value', name: 'value', autocomplete: 'off', maxlength: 64 });
  add(view, [
    h('p', { class: 'crumbs' }, h('a', { href: '#/', text: '← Fleet' })),
    h('div', { class: 'title' }, h('h1', { id: 'w-name', text: id }), h('span', { class: 'badge', id: 'w-badge' }),
      h('span', { class: 'muted small', id: 'w-seen' })),
    h('p', { class: 'meta', id: 'w-meta' }),
    h('div', { class: 'ranges', role: 'group', 'aria-label': 'Time range' }, rangeButtons,
      h('span', { class: 'muted small', id: 'w-res' })),
    h('div', { class: 'charts' }, CHARTS.map(chartFigure)),
    h('div', { class: 'cols' },
      h('section', { class: 'panel', 'aria-labelledby': 'inv-h' }, h('h2', { id: 'inv-h', text: 'Inventory' }),
        h('dl', { class: 'kv', id: 'w-inv' })),
      h('section', { class: 'panel', 'aria-labelledby': 'lab-h' },
        h('h2', { id: 'lab-h', text: 'Labels' }),
        h('ul', { class: 'chips', id: 'w-labels', 'aria-label': 'Labels' }),
        h('form', { class: 'row', id: 'label-form', onsubmit: addLabel },
          h('div', { class: 'field' }, h('label', { for: 'label-key', text: 'Key' }), labelKey),
          h('div', { class: 'field' }, h('label', { for: 'label-value', text: 'Value' }), labelVal),
          h('button', { type: 'submit', text: 'Add label' })),
        h('p', { class: 'error', id: 'label-error', role: 'alert' }),
        h('h2', { text: 'Actions' }),
        h('div', { class: 'row' }, h('button', { type: 'button', id: 'ping', text: 'Ping', onclick: ping }),
          h('span', { id: 'ping-result', class: 'muted', role: 'status' })),
        h('div', { class: 'row' },
          h('button', { type: 'button', id: 'rotate-secret', text: 'Rotate secret', onclick: rotateSecret,
            title: 'A new frame secret for this worker, sent sealed under its current one' }),
          h('span', { id: 'rotate-result', class: 'muted', role: 'status' })),
        h('div', { class: 'row' },
          h('button', { type: 'button', id: 'shell-open', text: 'Shell', onclick: openShell,
            title: 'An interactive shell on this worker (label remote-exec=allow, agent started with --allow-remote-exec)' }))),
      h('section', { class: 'panel span shell', id: 'shell-panel', 'aria-labelledby': 'shell-h', hidden: true },
        h('div', { class: 'row log-head' }, h('h2', { id: 'shell-h', text: 'Shell' }),
          h('span', { class: 'muted small', id: 'shell-state', role: 'status' }),
          h('button', { type: 'button', id: 'shell-close', text: 'Close', onclick: closeShell })),
        h('p', { class: 'error', id: 'shell-error', role: 'alert' }),
        h('div', { id: 'shell-term', 'aria-label': 'Terminal', hidden: true })),
      h('section', { class: 'panel span', 'aria-labelledby': 'wsvc-h' }, h('h2', { id: 'wsvc-h', text: 'Services' }),
        h('table', { class: 'svc-table', id: 'w-services', hidden: true },
          h('thead', {}, h('tr', {}, ['Service', 'Desired', 'Actual', 'PID', 'Restarts', 'Log'].map((t) => h('th', { text: t })))),
          h('tbody', { id: 'w-svc-rows' })),
        h('p', { class: 'muted small', id: 'w-svc-empty', role: 'status' })),
      logPanel(),
      h('section', { class: 'panel', 'aria-labelledby': 'ev-h' }, h('h2', { id: 'ev-h', text: 'Recent events' }),
        h('ul', { class: 'events', id: 'w-events' }))),
  ]);
  document.title = id + ' · aerekos';
  focusHeading(view);
  startPolling(pollWorker);
}

function setRange(k) {
  const w = st.worker;
  if (!w || !RANGES[k] || k === w.range) return;
  w.range = k;
  w.pts = [];
  w.lastT = null;
  w.fetchedAt = 0;
  w.gen++;
  for (const b of document.querySelectorAll('[data-range]')) b.setAttribute('aria-pressed', String(b.dataset.range === k));
  startPolling(pollWorker);
}

async function pollWorker() {
  const w = st.worker;
  if (!w) return;
  const gen = w.gen;
  let detail;
  try {
    // live=1: someone is looking, so a batching worker sends every sample.
    detail = await api('GET', `/workers/${enc(w.id)}?live=1`);
  } catch (e) {
    if (e.status !== 404 || st.worker !== w) throw e;
    stopPolling();
    $('#view').replaceChildren(h('p', { class: 'crumbs' }, h('a', { href: '#/', text: '← Fleet' })),
      h('h1', { text: 'Worker not found' }), h('p', { class: 'muted', text: `No worker has the id ${w.id}.` }));
    return;
  }
  if (st.worker !== w) return;
  w.detail = detail;
  renderWorkerInfo(w, detail);
  try {
    const sv = await api('GET', `/workers/${enc(w.id)}/services`);
    if (st.worker !== w) return;
    renderWorkerServices(w, sv.services || []);
  } catch (e) {
    if (e instanceof AuthError) throw e;
    w.servicesKey = null;
    setText($('#w-svc-empty'), 'Services unavailable: ' + e.message);
  }
  const r = RANGES[w.range];
  const base = `/workers/${enc(w.id)}/metrics?resolution=${r.res}`;
  if (r.res === 'raw') {
    const fresh = w.lastT === null || now() - w.lastT > r.ms / 4;
    const from = fresh ? Math.floor(now() - r.ms) : w.lastT + 1;
    const res = await api('GET', `${base}&from=${from}` + (fresh ? `&max_points=${CHART_POINTS}` : ''));
    if (st.worker !== w || w.gen !== gen) return;
    const got = (res.points || []).map(rawPoint);
    w.pts = fresh ? got : w.pts.concat(got);
    if (w.pts.length) w.lastT = w.pts[w.pts.length - 1].t;
    else if (fresh) w.lastT = null;
    const cut = now() - r.ms;
    w.pts = w.pts.filter((p) => p.t >= cut);
    if (w.pts.length > 4 * CHART_POINTS) w.pts = thin(w.pts, 2 * CHART_POINTS);
  } else if (Date.now() - w.fetchedAt > 30000) {
    const res = await api('GET', `${base}&from=${Math.floor(now() - r.ms)}&max_points=${CHART_POINTS}`);
    if (st.worker !== w || w.gen !== gen) return;
    w.pts = (res.points || []).map((p) => ({ t: p.minute_ms, v: fromMinute(p) }));
    w.fetchedAt = Date.now();
  }
  setText($('#w-res'), r.res === 'raw' ? 'raw samples, updated every 2 s' : 'per-minute aggregates');
  for (const def of CHARTS) {
    const fig = $(`[data-chart=${def.id}]`);
    if (fig) drawChart(fig, def, w.pts, r, r.res === 'minute');
  }
}

// A batching worker sends its samples every `interval_ms` in one frame;
// this page asks it for live samples while it is open (GET /workers/{id}?live=1).
function batchNote(d) {
  if (!d.batching) return '';
  return d.live_until_ms && d.live_until_ms > d.now_ms ? ' batches, live now' : ' batches';
}

function renderWorkerInfo(w, d) {
  const inv = d.inventory || {};
  const m = d.metrics ? d.metrics.metrics : null;
  setText($('#w-name'), d.hostname);
  document.title = d.hostname + ' · aerekos';
  setBadge($('#w-badge'), d);
  setText($('#w-seen'), 'last seen ' + fmt.ago(d.last_seen_ms));
  setText($('#w-meta'), [inv.device_model || 'unknown model', inv.arch, d.id].filter(Boolean).join(' · '));
  const rows = [
    ['Hostname', d.hostname], ['Worker id', d.id], ['Model', inv.device_model || dash],
    ['OS', inv.os], ['Kernel', inv.kernel], ['Architecture', inv.arch], ['CPU', inv.cpu_model],
    ['Cores', inv.cores], ['Memory', fmt.bytes(inv.memory_total)],
    ['Disks', (inv.disks || []).map((x) => `${x.mount} ${fmt.bytes(x.used)} of ${fmt.bytes(x.total)}`).join(', ') || dash],
    ['Uptime', m ? fmt.dur(m.uptime_s) : dash],
    ['Load', m ? m.load.map((l) => (l / 100).toFixed(2)).join(' ') : dash],
    ['Processes', m ? m.processes : dash],
    ['Swap', m && m.swap_total ? `${fmt.bytes(m.swap_used)} of ${fmt.bytes(m.swap_total)}` : dash],
    ['Agent', inv.agent_version], ['Interval', d.interval_ms ? d.interval_ms / 1000 + ' s' + batchNote(d) : dash],
    ['Enrolled', fmt.time(d.enrolled_at_ms)], ['Last seen', fmt.time(d.last_seen_ms)],
    ['Last IP', d.last_ip || dash],
    ['Frames', d.counters ? `${d.counters.accepted} accepted, ${d.counters.rejected} rejected` : dash],
  ];
  const b = d.board;
  if (b) {
    const sd = b.sd;
    rows.push(
      ['Pi board', [b.model && 'Raspberry Pi ' + b.model, b.memory_bytes && fmt.bytes(b.memory_bytes), b.revision && 'rev ' + b.revision].filter(Boolean).join(', ') || dash],
      ['Pi serial', b.serial],
      ['Pi power', b.throttled === null ? 'not reported by the kernel' : b.flags.length ? b.flags.join(', ').replaceAll('_', ' ') : 'OK'],
      ['SD card', sd ? [sd.name, sd.serial, sd.date && 'made ' + sd.date].filter(Boolean).join(', ') : dash]);
  }
  $('#w-inv').replaceChildren(...rows.flatMap(([k, v]) =>
    [h('dt', { text: k }), h('dd', { text: v === undefined || v === null || v === '' ? dash : String(v) })]));

  const labels = d.labels || {};
  const lkey = JSON.stringify(labels);
  if (w.labelsKey !== lkey) {
    w.labelsKey = lkey;
    const entries = Object.entries(labels);
    $('#w-labels').replaceChildren(...(entries.length ? entries.map(([k, v]) =>
      h('li', { class: 'chip' }, k + '=' + v,
        h('button', { type: 'button', 'aria-label': `Remove label ${k}`, text: '×', onclick: () => removeLabel(k) }))) :
      [h('li', { class: 'muted small', text: 'No labels.' })]));
  }
  const events = d.events || [];
  const ekey = events.length + ':' + (events.length ? events[events.length - 1].received_at_ms : 0);
  if (w.eventsKey !== ekey) {
    w.eventsKey = ekey;
    $('#w-events').replaceChildren(...(events.length ? events.slice().reverse().map((e) =>
      h('li', {}, h('span', { class: 'muted', text: fmt.time(e.received_at_ms) + ' ' }), e.kind + (e.detail ? ': ' + e.detail : ''))) :
      [h('li', { class: 'muted', text: 'No events since the conductor started.' })]));
  }
}

async function putLabels(labels) {
  const w = st.worker;
  const err = $('#label-error');
  setText(err, '');
  try {
    const r = await api('PUT', `/workers/${enc(w.id)}/labels`, labels);
    w.labelsKey = null;
    if (w.detail) { w.detail.labels = r.labels; renderWorkerInfo(w, w.detail); }
    return true;
  } catch (e) {
    if (!(e instanceof AuthError)) setText(err, e.message);
    return false;
  }
}
async function addLabel(ev) {
  ev.preventDefault();
  const w = st.worker;
  const k = $('#label-key').value.trim(), v = $('#label-value').value.trim();
  if (!w || !w.detail) return;
  if (!k) { setText($('#label-error'), 'Enter a key.'); $('#label-key').focus(); return; }
  if (await putLabels(Object.assign({}, w.detail.labels, { [k]: v }))) {
    $('#label-key').value = '';
    $('#label-value').value = '';
    $('#label-key').focus();
  }
}
async function removeLabel(k) {
  const w = st.worker;
  if (!w || !w.detail) return;
  const labels = Object.assign({}, w.detail.labels);
  delete labels[k];
  if (await putLabels(labels)) $('#label-key').focus();
}
async function ping() {
  const w = st.worker, btn = $('#ping'), out = $('#ping-result');
  btn.disabled = true;
  setText(out, 'waiting for the reply…');
  try {
    const r = await api('POST', `/workers/${enc(w.id)}/commands`, { action: 'ping' });
    setText(out, `${r.status}: ${r.detail || 'pong'} in ${r.round_trip_ms} ms`);
  } catch (e) {
    setText(out, e instanceof AuthError ? '' : e.message);
  } finally {
    btn.disabled = false;
  }
}

async function rotateSecret() {
  const w = st.worker, btn = $('#rotate-secret'), out = $('#rotate-result');
  btn.disabled = true;
  setText(out, 'sending the new secret…');
  try {
    const r = await api('POST', `/workers/${enc(w.id)}/rotate-secret`, {});
    setText(out, r.state === 'rotated' ? 'secret rotated' : `pending: ${r.detail}`);
  } catch (e) {
    setText(out, e instanceof AuthError ? '' : e.message);
  } finally {
    btn.disabled = false;
  }
}

// ---------- shell (terminal.js) ----------
function openShell() {
  const w = st.worker;
  if (!w) return;
  if (w.shell && !w.shell.done) return w.shell.term.el.focus();
  // role=application: screen readers pass every key through, as a terminal needs.
  const box = h('div', { id: 'shell-term', role: 'application', 'aria-label': 'Terminal', 'aria-roledescription': 'terminal' });
  $('#shell-term').replaceWith(box);
  $('#shell-panel').hidden = false;
  setText($('#shell-error'), '');
  setText($('#shell-state'), 'connecting…');
  setText($('#shell-h'), 'Shell on ' + (w.detail ? w.detail.hostname : w.id));
  const on = {
    start: () => setText($('#shell-state'), 'connected'),
    end: (line) => { if (line) setText($('#shell-state'), line); },
    error: (m) => {
      setText($('#shell-error'), m);
      if (!s.hex) { box.hidden = true; setText($('#shell-state'), ''); }
    },
  };
  const s = w.shell = new Shell(w.id, box, on);
  box.focus();
  $('#shell-panel').scrollIntoView({ block: 'nearest' });
}
function closeShell() {
  const w = st.worker;
  if (w && w.shell) w.shell.close();
  $('#shell-panel').hidden = true;
  $('#shell-open').focus();
}

// The Services section of a worker page.
function renderWorkerServices(w, list) {
  const key = JSON.stringify(list);
  if (w.servicesKey === key) return;
  w.servicesKey = key;
  $('#w-svc-rows').replaceChildren(...list.map((x) => {
    const a = x.actual, d = x.desired, td = (label, ...kids) => h('td', { 'data-label': label }, ...kids);
    const badge = h('span', {});
    stateBadge(badge, a);
    return h('tr', { 'data-service': x.name },
      td('Service', h('a', { href: '#/services/' + enc(x.name), text: x.name })),
      td('Desired', d ? `${d.state} v${d.version}` : 'remove'),
      td('Actual', badge, a ? ' v' + a.version : '', x.in_sync ? '' : h('span', { class: 'muted small nowrap', text: ' out of sync' })),
      td('PID', a && a.pid ? String(a.pid) : dash),
      td('Restarts', a ? String(a.restarts) : dash),
      td('Log', h('button', { type: 'button', 'data-log': x.name, text: 'Log tail', 'aria-label': 'Log tail of ' + x.name,
        onclick: (ev) => openLog(w.id, w.detail ? w.detail.hostname : w.id, x.name, ev.currentTarget) })));
  }));
  $('#w-services').hidden = !list.length;
  setText($('#w-svc-empty'), list.length ? '' : 'No services on this worker.');
}
