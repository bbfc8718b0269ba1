// The alerts page (#/alerts): what is firing, the resolved history, one
// alert's notifications, the rules and the webhook receivers.
import { $, add, api, AuthError, attrs, dash, enc, fmt, focusHeading, h, now, rows, setKv, setText, showError, st, startPolling, table, td, toast } from './core.js';
import { secretBox } from './settings.js';

const HISTORY = 50; // resolved alerts shown
const KINDS = [['worker_offline', 'worker offline'], ['metric_above', 'metric above'],
  ['service_failed', 'service failed or unhealthy'], ['rollout_reverted', 'rollout reverted'],
  ['agent_update_failed', 'agent update failed']];
const METRICS = [['cpu', 'CPU'], ['memory', 'memory'], ['disk', 'disk'], ['temperature', 'temperature'],
  ['under_voltage', 'Pi under-voltage (0/1)'], ['throttling', 'Pi throttling (0/1)']];
const FLAGS = ['under_voltage', 'throttling']; // 0 or 1: a rule on them takes threshold 0
const unit = (m) => (FLAGS.includes(m) ? '' : m === 'temperature' ? ' °C' : ' %');
const takesService = (k) => k === 'service_failed' || k === 'rollout_reverted';
const fleetWide = (k) => k === 'rollout_reverted' || k === 'agent_update_failed'; // no selector

const actions = (...btns) => h('td', { 'data-label': 'Action', 'data-col': 'actions' }, h('div', { class: 'btns' }, btns));

export function alertsView(view) {
  const s = { sel: null, keys: {}, byId: new Map(), hosts: new Map(), refresh: () => startPolling(pollAlerts) };
  st.alerts = s;
  const section = (id, title, ...kids) => h('section', { class: 'panel', id, 'aria-labelledby': id + '-h' },
    h('h2', { id: id + '-h', text: title }), ...kids);
  add(view, [
    h('div', { class: 'summary' }, h('h1', { text: 'Alerts' }), h('span', { class: 'muted', id: 'al-count' })),
    h('div', { class: 'stack', id: 'alerts' },
      section('al-firing', 'Firing',
        table('al-fire', ['Rule', 'Subject', 'Since', 'Summary', 'Action']),
        h('p', { class: 'muted small', id: 'al-fire-empty' })),
      section('al-detail', 'Alert',
        h('dl', { class: 'kv', id: 'al-detail-kv' }),
        h('h3', { text: 'Notifications' }),
        table('al-notes', ['Event', 'Receiver', 'Attempts', 'Delivery']),
        h('p', { class: 'muted small', id: 'al-notes-empty' }),
        h('div', { class: 'row' }, h('button', { type: 'button', id: 'al-detail-close', text: 'Close', onclick: () => select(s, null) }))),
      section('al-history', 'History',
        table('al-hist', ['Rule', 'Subject', 'Fired', 'Resolved', 'Summary', 'Action']),
        h('p', { class: 'muted small', id: 'al-hist-empty' })),
      section('al-rules', 'Rules', rulesForm(s)),
      section('al-receivers', 'Receivers', receiversForm(s))),
  ]);
  $('#al-detail').hidden = true;
  $('#al-detail-h').setAttribute('tabindex', '-1');
  syncRuleForm();
  document.title = 'Alerts · aerekos';
  focusHeading(view);
  startPolling(pollAlerts);
}

// ---------- alerts ----------
async function pollAlerts() {
  const s = st.alerts;
  const [firing, resolved, rules, rcv, fleet] = await Promise.all([api('GET', '/alerts?state=firing&limit=1000'),
    api('GET', `/alerts?state=resolved&limit=${HISTORY}`), api('GET', '/alert-rules'), api('GET', '/alert-receivers'), api('GET', '/workers')]);
  if (st.alerts !== s) return;
  const fire = firing.alerts || [], hist = resolved.alerts || [];
  s.hosts = new Map((fleet.workers || []).map((w) => [w.id, w.hostname]));
  s.byId = new Map(fire.concat(hist).map((a) => [a.id, a]));
  if (s.sel !== null && !s.byId.has(s.sel)) {
    // Older than the history shown: asked for on its own.
    const a = await api('GET', '/alerts/' + s.sel).catch((e) => { if (e instanceof AuthError) throw e; return null; });
    if (st.alerts !== s) return;
    if (a) s.byId.set(a.id, a);
    else s.sel = null;
  }
  // Table keys leave out the notifications (shown in the detail only).
  const brief = (list) => JSON.stringify([list.map(({ notifications, ...a }) => a), [...s.hosts]]);
  rows(s, 'al-fire', brief(fire), fire, (a) => alertRow(s, a, false), 'Nothing is firing.');
  rows(s, 'al-hist', brief(hist), hist, (a) => alertRow(s, a, true), 'No resolved alerts yet.');
  setText($('#al-count'), `${fire.length} firing` + (hist.length >= HISTORY ? `, the latest ${HISTORY} resolved` : ''));
  renderRules(s, rules.rules || []);
  renderReceivers(s, rcv.receivers || []);
  renderDetail(s);
  for (const el of document.querySelectorAll('#alerts [data-ago]')) setText(el, fmt.ago(Number(el.dataset.ago)));
  $('#alerts').dataset.loaded = '1';
}

// Worker subjects are links to the worker page (by hostname when known).
function subject(s, a) {
  const worker = (id) => h('a', { href: '#/workers/' + enc(id), text: s.hosts.get(id) || id });
  if (a.kind === 'worker_offline' || a.kind === 'metric_above') return worker(a.subject);
  const i = a.subject.indexOf('/');
  if (a.kind === 'service_failed' && i > 0) {
    const name = a.subject.slice(i + 1);
    return [h('a', { href: '#/services/' + enc(name), text: name }), ' on ', worker(a.subject.slice(0, i))];
  }
  return a.subject;
}
const when = (ms) => [fmt.time(ms), h('br'), h('span', { class: 'muted small', 'data-ago': ms, text: fmt.ago(ms) })];

function alertRow(s, a, resolved) {
  const open = s.sel === a.id;
  return h('tr', { 'data-alert': a.id, 'data-state': a.state, class: open ? 'sel' : null,
    onclick: (ev) => { if (!ev.target.closest('a')) select(s, a.id); } },
  td('Rule', a.rule, 'rule'),
  h('td', { 'data-label': 'Subject', 'data-col': 'subject' }, subject(s, a)),
  h('td', { 'data-label': resolved ? 'Fired' : 'Since', 'data-col': 'fired' }, when(a.fired_ms)),
  resolved ? h('td', { 'data-label': 'Resolved', 'data-col': 'resolved' }, when(a.resolved_ms),
    a.resolved_why ? h('span', { class: 'muted small', text: ' · ' + a.resolved_why }) : null) : null,
  td('Summary', a.summary, 'summary'),
  actions(h('button', { type: 'button', 'data-alert': a.id, 'aria-controls': 'al-detail', 'aria-expanded': String(open),
    'aria-label': `Notifications of alert ${a.id} (${a.rule})`, text: 'Notifications' })));
}

function select(s, id) {
  s.sel = id;
  for (const tr of document.querySelectorAll('#alerts tr[data-alert]')) {
    const on = Number(tr.dataset.alert) === id;
    tr.classList.toggle('sel', on);
    $('button[data-alert]', tr).setAttribute('aria-expanded', String(on));
  }
  renderDetail(s);
  if (id !== null) $('#al-detail-h').focus();
}

function delivery(n) {
  if (n.delivered_ms) return 'delivered ' + fmt.time(n.delivered_ms);
  return (n.last_error ? 'not delivered: ' + n.last_error : 'queued') +
    (n.next_attempt_ms > now() ? ', next attempt ' + fmt.time(n.next_attempt_ms) : '');
}
function renderDetail(s) {
  const a = s.sel === null ? null : s.byId.get(s.sel);
  $('#al-detail').hidden = !a;
  if (!a) return;
  const resolved = a.state === 'resolved';
  setText($('#al-detail-h'), `Alert ${a.id}: ${a.rule}`);
  setKv($('#al-detail-kv'), [
    ['State', a.state], ['Kind', a.kind.replace('_', ' ')], ['Subject', a.subject], ['Summary', a.summary],
    a.value !== null && a.value !== undefined && ['Value', a.value],
    ['Fired', fmt.time(a.fired_ms)],
    resolved && ['Resolved', fmt.time(a.resolved_ms) + (a.resolved_why ? ' · ' + a.resolved_why : '')],
  ]);
  const notes = a.notifications || [];
  rows(s, 'al-notes', JSON.stringify([a.id, notes]), notes, (n) => h('tr', { 'data-note': n.id, 'data-delivered': n.delivered_ms ? '1' : '0' },
    td('Event', n.event), td('Receiver', n.receiver || '(deleted receiver)'), td('Attempts', n.attempts),
    td('Delivery', delivery(n), 'delivery')), 'No receivers were notified (none was set up).');
}

// ---------- rules ----------
function field(id, label, input, hint, k) {
  return h('div', { class: 'field', 'data-k': k || null }, h('label', { for: id, text: label }),
    attrs(input, { id, 'aria-describedby': hint ? id + '-hint' : null }),
    hint ? h('span', { class: 'muted small', id: id + '-hint', text: hint }) : null);
}
const text = (a) => h('input', Object.assign({ autocomplete: 'off', spellcheck: 'false' }, a));
const choice = (opts) => h('select', {}, opts.map(([v, t]) => h('option', { value: v, text: t })));

function rulesForm(s) {
  return [
    h('p', { class: 'muted small', text: 'An alert fires once its rule\'s condition has held for "for", and resolves once it clears; both are posted to every receiver.' }),
    table('ar', ['Name', 'Watches', 'For', 'Workers', 'Created', 'Action']),
    h('p', { class: 'muted small', id: 'ar-empty' }),
    h('form', { id: 'ar-form', novalidate: true, onsubmit: (ev) => createRule(ev, s), onchange: syncRuleForm },
      h('h3', { text: 'Add a rule' }),
      h('div', { class: 'form-grid' },
        field('ar-name', 'Name', text({ maxlength: 64 })),
        field('ar-kind', 'Kind', choice(KINDS)),
        field('ar-metric', 'Metric', choice(METRICS), null, 'metric'),
        field('ar-threshold', 'Above', h('input', { type: 'number', step: 'any', inputmode: 'decimal' }), 'percent; °C for temperature; 0 for the Pi flags', 'metric'),
        field('ar-for', 'For', text({ placeholder: '0s' }), 'how long it must hold: 30s, 5m, 1h (empty: 0s)'),
        field('ar-selector', 'Workers with labels', text({ class: 'mono', placeholder: 'site=shop' }), 'key=value, comma-separated (empty: every worker)', 'sel'),
        field('ar-service', 'Service', text({ maxlength: 32 }), 'empty: every service', 'service')),
      h('p', { class: 'error', id: 'ar-error', role: 'alert' }),
      h('div', { class: 'row' }, h('button', { type: 'submit', class: 'primary', id: 'ar-add', text: 'Add rule' }))),
  ];
}
// Shows the fields the chosen kind takes.
function syncRuleForm() {
  const k = $('#ar-kind').value;
  for (const el of document.querySelectorAll('#ar-form [data-k]')) {
    const w = el.dataset.k;
    el.hidden = w === 'metric' ? k !== 'metric_above' : w === 'service' ? !takesService(k) : fleetWide(k);
  }
}
const selText = (o) => Object.entries(o || {}).map(([k, v]) => k + '=' + v).join(', ');
function watches(r) {
  if (r.kind === 'metric_above') return FLAGS.includes(r.metric) ? r.metric.replace('_', ' ') : `${r.metric} above ${r.threshold}${unit(r.metric)}`;
  const k = (KINDS.find(([v]) => v === r.kind) || [r.kind, r.kind])[1];
  return takesService(r.kind) ? `${k}: ${r.service || 'any service'}` : k;
}
function renderRules(s, list) {
  rows(s, 'ar', JSON.stringify(list), list, (r) => h('tr', { 'data-rule': r.id },
    td('Name', r.name, 'name'), td('Watches', watches(r)), td('For', r.for || '0s'),
    td('Workers', fleetWide(r.kind) ? dash : selText(r.selector) || 'all'), td('Created', fmt.time(r.created_ms)),
    actions(h('button', { type: 'button', class: 'danger', text: 'Delete', 'aria-label': 'Delete rule ' + r.name, onclick: () => deleteRule(s, r) }))),
  'No rules: nothing is watched.');
}
async function createRule(ev, s) {
  ev.preventDefault();
  const err = $('#ar-error'), val = (id) => $('#' + id).value.trim(), kind = val('ar-kind');
  setText(err, '');
  const fail = (id, msg) => { setText(err, msg); $('#' + id).focus(); };
  const body = { name: val('ar-name'), kind };
  if (!body.name) return fail('ar-name', 'Enter a name.');
  if (kind === 'metric_above') {
    const t = val('ar-threshold');
    if (t === '' || !Number.isFinite(Number(t))) return fail('ar-threshold', 'Enter the threshold, a number.');
    Object.assign(body, { metric: val('ar-metric'), threshold: Number(t) });
  }
  if (val('ar-for')) body.for = val('ar-for');
  if (!fleetWide(kind)) {
    const sel = {};
    for (const p of val('ar-selector').split(/[,\s]+/).filter(Boolean)) {
      const eq = p.indexOf('=');
      if (eq < 1) return fail('ar-selector', `"${p}" is not key=value.`);
      sel[p.slice(0, eq)] = p.slice(eq + 1);
    }
    if (Object.keys(sel).length) body.selector = sel;
  }
  if (takesService(kind) && val('ar-service')) body.service = val('ar-service');
  const btn = $('#ar-add');
  btn.disabled = true;
  try {
    const r = await api('POST', '/alert-rules', body);
    if (st.alerts !== s) return;
    ev.target.reset();
    syncRuleForm();
    toast(`Rule ${r.name} added`);
    s.refresh();
  } catch (e) {
    showError('#ar-error', 'Rule not added: ')(e);
  } finally {
    btn.disabled = false;
  }
}
async function deleteRule(s, r) {
  setText($('#ar-error'), '');
  try {
    await api('DELETE', '/alert-rules/' + enc(r.id));
    toast(`Rule ${r.name} deleted; its firing alerts resolve`);
    $('#ar-name').focus();
    s.refresh();
  } catch (e) { showError('#ar-error', 'Not deleted: ')(e); }
}

// ---------- receivers ----------
function receiversForm(s) {
  return [
    h('p', { class: 'muted small', text: 'Webhooks: each firing and resolution is POSTed as JSON, signed with the receiver\'s secret (X-Aerekos-Signature), and retried until it is taken.' }),
    table('rc', ['Name', 'URL', 'Created', 'Action']),
    h('p', { class: 'muted small', id: 'rc-empty' }),
    h('form', { class: 'row', id: 'rc-form', novalidate: true, onsubmit: (ev) => createReceiver(ev, s) },
      field('rc-name', 'Name', text({ maxlength: 64 })),
      field('rc-url', 'URL', text({ type: 'url', maxlength: 2048, class: 'mono', placeholder: 'https://hooks.example.org/aerekos' })),
      h('button', { type: 'submit', id: 'rc-add', text: 'Add receiver' })),
    h('p', { class: 'error', id: 'rc-error', role: 'alert' }),
    h('div', { id: 'rc-result', hidden: true }),
  ];
}
function renderReceivers(s, list) {
  rows(s, 'rc', JSON.stringify(list), list, (r) => h('tr', { 'data-receiver': r.id },
    td('Name', r.name, 'name'), td('URL', r.url, 'url'), td('Created', fmt.time(r.created_ms)),
    actions(h('button', { type: 'button', class: 'danger', text: 'Delete', 'aria-label': 'Delete receiver ' + r.name, onclick: () => deleteReceiver(s, r) }))),
  'No receivers: alerts are listed here, nobody is notified.');
}
async function createReceiver(ev, s) {
  ev.preventDefault();
  const name = $('#rc-name').value.trim(), url = $('#rc-url').value.trim(), err = $('#rc-error');
  setText(err, '');
  if (!name) { setText(err, 'Enter a name.'); return $('#rc-name').focus(); }
  if (!/^https?:\/\/\S/.test(url)) { setText(err, 'Enter an http:// or https:// URL.'); return $('#rc-url').focus(); }
  try {
    const r = await api('POST', '/alert-receivers', { name, url });
    if (st.alerts !== s) return;
    ev.target.reset();
    const box = $('#rc-result');
    // The only time the secret is shown: the list never has it.
    box.replaceChildren(
      h('p', { class: 'notice', id: 'rc-secret-note', text: `Signing secret of "${r.name}". It will not be shown again: copy it now into the receiving end.` }),
      secretBox('rc-secret', r.secret, 'signing secret'),
      h('button', { type: 'button', id: 'rc-done', text: 'Done, hide it', onclick: () => { box.replaceChildren(); box.hidden = true; $('#rc-name').focus(); } }));
    box.hidden = false;
    $('#rc-secret').focus();
    $('#rc-secret').select();
    s.refresh();
  } catch (e) { showError('#rc-error', 'Receiver not added: ')(e); }
}
async function deleteReceiver(s, r) {
  setText($('#rc-error'), '');
  try {
    await api('DELETE', '/alert-receivers/' + enc(r.id));
    toast(`Receiver ${r.name} deleted`);
    $('#rc-name').focus();
    s.refresh();
  } catch (e) { showError('#rc-error', 'Not deleted: ')(e); }
}
