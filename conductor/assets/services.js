// The services page (#/services): every service with desired vs actual, the
// new-service form, the artifacts. Also what the other pages say about a
// service (summaries, spec text).
import { $, add, api, AuthError, attrs, dash, enc, fmt, focusHeading, h, kv, place, setText, st, startPolling, toast } from './core.js';
import { artifactsPanel, renderArtifacts, short } from './artifacts.js';

const NAME_RE = /^[a-z0-9-]{1,32}$/;
const U32 = 4294967295;
export const OPS = { start: 'Start', stop: 'Stop', restart: 'Restart' };
export const quote = (a) => (a === '' || /[\s"'\\]/.test(a) ? JSON.stringify(a) : a);
const cmdLine = (spec) => [spec.command, ...(spec.args || []).map(quote)].join(' ');
export const latestSpec = (d) => { const v = d.versions || []; return v.length ? v[v.length - 1] : null; };
export const kindOf = (sp) => (sp && sp.kind) || 'process';
const words = (t) => t.split(/\s+/).filter(Boolean);
export const pairs = (o, sep) => Object.entries(o || {}).map(([k, v]) => k + '=' + (typeof v === 'string' ? v : JSON.stringify(v))).join(sep || ' ');
export const portText = (p) => `${p.host}:${p.container}/${p.udp ? 'udp' : 'tcp'}`;
export const volText = (v) => `${v.source}:${v.target}` + (v.read_only ? ':ro' : '');
// What runs: the command line, the image, or the artifact per architecture.
export const program = (sp) => !sp ? dash : sp.image ? [sp.image, ...(sp.args || []).map(quote)].join(' ')
  : sp.command ? cmdLine(sp) : pairs(Object.fromEntries(Object.entries(sp.artifacts || {}).map(([a, x]) => [a, short(x)])));
export function healthText(c) {
  if (!c) return 'none';
  const p = c.http ? `HTTP GET :${c.http.port}${c.http.path}` : 'command ' + [c.command.command, ...(c.command.args || []).map(quote)].join(' ');
  return `${p}, every ${c.interval_ms} ms, timeout ${c.timeout_ms} ms, unhealthy after ${c.retries} failures` +
    (c.start_period_ms ? `, ${c.start_period_ms} ms grace` : '');
}
export const limitsText = (l) => [l.memory_bytes && fmt.bytes(l.memory_bytes) + ' memory', l.cpu_millicores && l.cpu_millicores / 1000 + ' CPU',
  l.pids && l.pids + ' processes'].filter(Boolean).join(', ') || 'none';

export function stateBadge(el, a) {
  const s = a ? a.state : 'unknown';
  el.className = 'badge ' + s;
  setText(el, a ? s : 'not reported');
}
// Desired vs actual for one service detail: { text, cls, label }.
export function svcSummary(d) {
  const dep = d.deployment;
  if (!dep) return { text: '', cls: 'none', label: 'not deployed' };
  const rows = d.workers || [], want = dep.desired_state || 'running';
  const meets = (a) => a.state === want || (want === 'running' && a.state === 'healthy');
  const n = rows.filter((r) => r.actual && meets(r.actual) && r.actual.version === r.desired_version).length;
  const sync = rows.length > 0 && rows.every((r) => r.in_sync) && !(d.untargeted || []).length;
  const held = rows.filter((r) => r.desired_state !== want).length; // stopped on one worker by request
  return {
    text: rows.length ? `${n}/${rows.length} ${want}` + (held ? `, ${held} stopped by request` : '') : 'no worker matches the placement',
    cls: sync ? 'sync' : 'unsync', label: sync ? 'in sync' : 'out of sync',
  };
}
export function placement(dep, hosts) {
  if (!dep) return 'not deployed';
  const parts = [];
  if ((dep.workers || []).length) parts.push('workers ' + dep.workers.map((id) => hosts.get(id) || id).join(', '));
  const labels = Object.entries(dep.labels || {}).map(([k, v]) => k + '=' + v);
  if (labels.length) parts.push('labels ' + labels.join(', '));
  return (parts.join(' + ') || 'nobody') + ` · v${dep.version}, ${dep.desired_state}`;
}

export function servicesView(view) {
  const s = { cards: new Map(), arts: [], artKey: null, artSel: {}, refresh: () => startPolling(pollServices) };
  st.svcList = s;
  add(view, [
    h('div', { class: 'summary' }, h('h1', { text: 'Services' }), h('span', { class: 'muted', id: 'svc-count' })),
    h('div', { class: 'row' },
      h('button', { type: 'button', id: 'new-service', class: 'primary', 'aria-expanded': 'false', 'aria-controls': 'svc-form',
        text: 'New service', onclick: () => openServiceForm(true) })),
    serviceForm(),
    h('p', { id: 'svc-empty', class: 'empty', hidden: true }),
    h('ul', { id: 'services-list', class: 'cards svc-cards', 'aria-label': 'Services' }),
    artifactsPanel(s),
  ]);
  document.title = 'Services · aerekos';
  focusHeading(view);
  if (st.prefill) {
    const p = st.prefill, hc = p.health || {}, l = p.limits || {};
    st.prefill = null;
    openServiceForm(false);
    const set = (id, v) => { if (v !== undefined && v !== null) $('#' + id).value = v; };
    const lines = (a, f) => (a || []).map(f).join('\n');
    set('sf-name', p.name);
    set('sf-kind', kindOf(p));
    set('sf-command', p.command);
    set('sf-image', p.image);
    set('sf-args', (p.args || []).join('\n'));
    set('sf-env', pairs(p.env, '\n'));
    set('sf-ports', lines(p.ports, portText));
    set('sf-vols', lines(p.volumes, volText));
    set('sf-dir', p.working_dir);
    set('sf-restart', p.restart);
    set('sf-max', p.max_restarts);
    set('sf-window', p.restart_window_s);
    set('sf-backoff', p.backoff_ms);
    set('sf-hc', hc.http ? 'http' : hc.command ? 'command' : '');
    if (hc.http) { set('sf-hport', hc.http.port); set('sf-hpath', hc.http.path); }
    if (hc.command) set('sf-hcmd', [hc.command.command, ...(hc.command.args || [])].map(quote).join(' '));
    for (const k of ['interval_ms', 'timeout_ms', 'retries', 'start_period_ms']) set('sf-h-' + k, hc[k]);
    set('sf-mem', l.memory_bytes && l.memory_bytes / 1048576);
    set('sf-cpu', l.cpu_millicores);
    set('sf-pids', l.pids);
    set('sf-config', pairs(p.config, '\n'));
    if ((p.secrets || []).length) {
      setText($('#sf-secrets-hint'), `Not copied (never shown): enter the values of ${p.secrets.join(', ')} again, or the new version has no secrets.`);
    }
    s.artSel = Object.assign({}, p.artifacts);
    syncForm();
    setText($('#sf-title'), 'New version of ' + p.name);
    $('#sf-kind').focus();
  }
  startPolling(pollServices);
}

function serviceForm() {
  const field = (id, label, input, hint, k) => h('div', { class: 'field', 'data-k': k },
    h('label', { for: id, text: label }), attrs(input, { id, 'aria-describedby': hint ? id + '-hint' : null }),
    hint ? h('span', { class: 'muted small', id: id + '-hint', text: hint }) : null);
  const num = (value, max) => h('input', { type: 'number', min: 0, max, step: 1, value, inputmode: 'numeric' });
  const text = (a) => h('input', Object.assign({ autocomplete: 'off', spellcheck: 'false', class: 'mono' }, a));
  const area = (a) => h('textarea', Object.assign({ rows: 3, spellcheck: 'false', class: 'mono' }, a));
  const select = (opts) => h('select', {}, opts.map(([v, t]) => h('option', { value: v, text: t })));
  return h('form', { class: 'panel svc-form', id: 'svc-form', hidden: true, novalidate: true, onsubmit: createService, onchange: syncForm },
    h('h2', { id: 'sf-title', text: 'New service' }),
    h('p', { class: 'muted small', text: 'A process or a container the workers run and supervise. Storing a spec under an existing name creates its next version; deploy it from the service page.' }),
    h('div', { class: 'form-grid' },
      field('sf-name', 'Name', h('input', { maxlength: 32, autocomplete: 'off', spellcheck: 'false' }), 'a-z, 0-9 and -, up to 32'),
      field('sf-kind', 'Kind', select([['process', 'process'], ['container', 'container']])),
      field('sf-command', 'Command', text({ maxlength: 1024 }), 'executable name or path, or an artifact below', 'process'),
      h('div', { class: 'field', 'data-k': 'process', id: 'sf-arts' }),
      field('sf-image', 'Image', text({ maxlength: 1024, placeholder: 'nginx:alpine' }), null, 'container'),
      field('sf-args', 'Arguments', area(), 'one per line (a single line is split at spaces); a container: its command'),
      field('sf-env', 'Environment', area({ placeholder: 'KEY=value' }), 'KEY=value, one per line'),
      field('sf-ports', 'Ports', area({ rows: 2, placeholder: '8080:80/tcp' }), 'host:container[/udp], one per line', 'container'),
      field('sf-vols', 'Volumes', area({ rows: 2, placeholder: '/srv/data:/data:ro' }), '/device/path:/container/path[:ro], one per line', 'container'),
      field('sf-dir', 'Working directory', text({ maxlength: 1024 }), 'empty: the service\'s own directory', 'process'),
      field('sf-restart', 'Restart policy', select([['on-failure', 'on failure'], ['always', 'always'], ['never', 'never']])),
      field('sf-max', 'Max restarts', num(5, 65535), 'within the window, then failed'),
      field('sf-window', 'Restart window (s)', num(60, U32)),
      field('sf-backoff', 'First backoff (ms)', num(1000, U32)),
      field('sf-hc', 'Health check', select([['', 'none'], ['http', 'HTTP GET'], ['command', 'command']])),
      field('sf-hport', 'Probe port', num('', 65535), null, 'http'),
      field('sf-hpath', 'Probe path', text({ value: '/' }), null, 'http'),
      field('sf-hcmd', 'Probe command', text({}), 'healthy when it exits 0', 'command'),
      field('sf-h-interval_ms', 'Probe interval (ms)', num(2000, U32), null, 'hc'),
      field('sf-h-timeout_ms', 'Probe timeout (ms)', num(1000, U32), null, 'hc'),
      field('sf-h-retries', 'Failures before unhealthy', num(3, 65535), null, 'hc'),
      field('sf-h-start_period_ms', 'Start grace (ms)', num(0, U32), null, 'hc'),
      field('sf-mem', 'Memory limit (MiB)', num('', 1048576), 'empty: no limit'),
      field('sf-cpu', 'CPU limit (millicores)', num('', U32), '1000 = one core'),
      field('sf-pids', 'Process limit', num('', U32)),
      field('sf-config', 'Config', area({ placeholder: 'KEY=value' }), 'KEY=value, one per line'),
      field('sf-secrets', 'Secrets', area({ class: 'mono masked', autocomplete: 'off', placeholder: 'KEY=value' }),
        'KEY=value, one per line; stored with the spec, never shown again')),
    h('p', { class: 'error', id: 'sf-error', role: 'alert' }),
    h('div', { class: 'row' }, h('button', { type: 'submit', class: 'primary', text: 'Create service' }),
      h('button', { type: 'button', text: 'Cancel', onclick: closeServiceForm })));
}
// Shows the fields of the chosen kind and health check.
function syncForm() {
  const k = $('#sf-kind').value, hc = $('#sf-hc').value;
  for (const el of document.querySelectorAll('#svc-form [data-k]')) {
    const w = el.dataset.k;
    el.hidden = w === 'hc' ? !hc : w === 'http' || w === 'command' ? hc !== w : w !== k;
  }
}
// One select per architecture that has artifacts; keeps the choices.
function renderArtSelects(s) {
  for (const sel of document.querySelectorAll('#sf-arts select')) s.artSel[sel.dataset.arch] = sel.value;
  const by = {};
  for (const a of s.arts) (by[a.arch] = by[a.arch] || []).push(a);
  const box = $('#sf-arts');
  box.replaceChildren(h('span', { class: 'label', text: 'Artifacts' }), ...Object.entries(by).map(([arch, list]) => {
    const sel = h('select', { id: 'sf-art-' + arch, 'data-arch': arch, 'aria-label': 'Artifact for ' + arch },
      h('option', { value: '', text: `${arch}: none` }),
      list.map((a) => h('option', { value: a.sha256, text: `${arch}: ${a.name || 'unnamed'} · ${short(a.sha256)}` })));
    sel.value = s.artSel[arch] || '';
    return sel;
  }), Object.keys(by).length ? null : h('span', { class: 'muted small', text: 'none uploaded (see Artifacts below)' }));
}
function openServiceForm(focus) {
  $('#svc-form').hidden = false;
  $('#new-service').setAttribute('aria-expanded', 'true');
  syncForm();
  if (focus) $('#sf-name').focus();
}
function closeServiceForm() {
  $('#svc-form').reset();
  $('#svc-form').hidden = true;
  setText($('#sf-error'), '');
  setText($('#sf-title'), 'New service');
  $('#new-service').setAttribute('aria-expanded', 'false');
  $('#new-service').focus();
}

async function createService(ev) {
  ev.preventDefault();
  const err = $('#sf-error'), val = (id) => $('#' + id).value, lines = (id) => val(id).split('\n').map((l) => l.trim());
  setText(err, '');
  const fail = (id, msg) => { setText(err, msg); $('#' + id).focus(); return null; };
  const num = (id, what, max, opt, min) => {
    const t = val(id).trim(), n = Number(t);
    if (opt && t === '') return undefined;
    return t !== '' && Number.isInteger(n) && n >= (min || 0) && n <= max ? n : fail(id, `${what} must be a whole number from ${min || 0} to ${max}.`);
  };
  // KEY=value lines → object, or null after reporting the bad line.
  const map = (id, what) => {
    const o = {}, ls = lines(id);
    for (const [i, l] of ls.entries()) {
      if (!l) continue;
      const eq = l.indexOf('=');
      if (eq < 1) return fail(id, `${what} line ${i + 1} is not KEY=value` + (id === 'sf-secrets' ? '.' : ': ' + l));
      o[l.slice(0, eq)] = l.slice(eq + 1);
    }
    return o;
  };
  const name = val('sf-name').trim(), command = val('sf-command').trim(), kind = val('sf-kind');
  if (!NAME_RE.test(name)) return fail('sf-name', 'Name: 1 to 32 characters of a-z, 0-9 and -.');
  const at = val('sf-args');
  const args = /\n/.test(at.trim()) ? at.split('\n').map((a) => a.trim()).filter(Boolean) : words(at);
  const body = { name, args, restart: val('sf-restart') };
  if (kind === 'container') {
    Object.assign(body, { kind, image: val('sf-image').trim(), ports: [], volumes: [] });
    if (!body.image) return fail('sf-image', 'Enter the image.');
    for (const l of lines('sf-ports').filter(Boolean)) {
      const m = l.match(/^(\d+):(\d+)(?:\/(tcp|udp))?$/);
      if (!m) return fail('sf-ports', `Port "${l}" is not host:container, e.g. 8080:80/tcp.`);
      body.ports.push({ host: +m[1], container: +m[2], udp: m[3] === 'udp' });
    }
    for (const l of lines('sf-vols').filter(Boolean)) {
      const m = l.match(/^([^:]+):([^:]+)(?::(ro|rw))?$/);
      if (!m) return fail('sf-vols', `Volume "${l}" is not /source:/target[:ro].`);
      body.volumes.push({ source: m[1], target: m[2], read_only: m[3] === 'ro' });
    }
  } else {
    const arts = {};
    for (const sel of document.querySelectorAll('#sf-arts select')) if (sel.value) arts[sel.dataset.arch] = sel.value;
    if (Object.keys(arts).length) {
      if (command) return fail('sf-command', 'Give a command or artifacts, not both.');
      body.artifacts = arts;
    } else if (!command) return fail('sf-command', 'Enter the command to run, or choose an artifact.');
    else body.command = command;
    body.working_dir = val('sf-dir').trim();
  }
  for (const [id, k, what, max] of [['sf-max', 'max_restarts', 'Max restarts', 65535], ['sf-window', 'restart_window_s', 'The restart window', U32],
    ['sf-backoff', 'backoff_ms', 'The backoff', U32]]) {
    if ((body[k] = num(id, what, max)) === null) return;
  }
  const hc = val('sf-hc');
  if (hc) {
    const c = body.health = {};
    for (const [k, what, max, min] of [['interval_ms', 'The probe interval', U32, 100], ['timeout_ms', 'The probe timeout', U32, 1],
      ['retries', 'Failures before unhealthy', 65535, 1], ['start_period_ms', 'The start grace', U32]]) {
      if ((c[k] = num('sf-h-' + k, what, max, false, min)) === null) return;
    }
    if (hc === 'http') {
      const port = num('sf-hport', 'The probe port', 65535, false, 1);
      if (port === null) return;
      c.http = { port, path: val('sf-hpath').trim() || '/' };
    } else {
      const [command, ...a] = words(val('sf-hcmd'));
      if (!command) return fail('sf-hcmd', 'Enter the probe command.');
      c.command = { command, args: a };
    }
  }
  const mem = num('sf-mem', 'The memory limit', 1048576, true, 1), cpu = num('sf-cpu', 'The CPU limit', U32, true, 1);
  const pids = num('sf-pids', 'The process limit', U32, true, 1);
  if (mem === null || cpu === null || pids === null) return;
  body.limits = { memory_bytes: mem && mem * 1048576, cpu_millicores: cpu, pids };
  for (const [id, k, what] of [['sf-env', 'env', 'Environment'], ['sf-config', 'config', 'Config'], ['sf-secrets', 'secrets', 'Secrets']]) {
    if ((body[k] = map(id, what)) === null) return;
  }
  const btn = $('#svc-form button[type=submit]');
  btn.disabled = true;
  try {
    const r = await api('POST', '/services', body);
    $('#sf-secrets').value = '';
    toast(`Stored ${r.name} version ${r.version}`);
    location.hash = '#/services/' + enc(r.name);
  } catch (e) {
    if (!(e instanceof AuthError)) setText(err, 'Not stored: ' + e.message);
  } finally {
    btn.disabled = false;
  }
}

// The services list plus one detail per service (desired vs actual) and the fleet (hostnames).
async function pollServices() {
  const s = st.svcList;
  const [list, fleet, arts] = await Promise.all([api('GET', '/services'), api('GET', '/workers'), api('GET', '/artifacts')]);
  const details = await Promise.all((list.services || []).map((x) => api('GET', '/services/' + enc(x.name)).catch((e) => {
    if (e instanceof AuthError) throw e;
    return { name: x.name, deployment: x.deployment, versions: [], workers: [], error: e.message };
  })));
  if (st.svcList !== s) return;
  s.arts = arts.artifacts || [];
  if (renderArtifacts(s, fleet.workers || [])) renderArtSelects(s);
  const hosts = new Map((fleet.workers || []).map((w) => [w.id, w.hostname]));
  const ul = $('#services-list'), seen = new Set();
  for (const [i, d] of details.entries()) {
    seen.add(d.name);
    let card = s.cards.get(d.name);
    if (!card) {
      card = h('li', { class: 'card', 'data-service': d.name },
        h('div', { class: 'card-head' }, h('a', { class: 'name', href: '#/services/' + enc(d.name), text: d.name }),
          h('span', { class: 'badge', 'data-f': 'sync' })),
        h('dl', { class: 'kv small' }));
      s.cards.set(d.name, card);
    }
    place(ul, card, i);
    const sum = svcSummary(d), spec = latestSpec(d);
    const b = $('[data-f=sync]', card);
    b.className = 'badge ' + sum.cls;
    setText(b, sum.label);
    card.dataset.sync = sum.cls;
    const rows = [
      ['Version', spec ? `v${spec.version}` + (d.deployment && d.deployment.version !== spec.version ? ` (v${d.deployment.version} deployed)` : '') : dash],
      ['Kind', spec ? kindOf(spec.spec) : dash],
      ['Program', spec ? program(spec.spec) : d.error, 'mono'],
      ['Placement', placement(d.deployment, hosts)],
      ['Status', sum.text || dash],
    ];
    const key = JSON.stringify(rows);
    const dl = $('dl', card);
    if (dl.dataset.key !== key) {
      dl.dataset.key = key;
      dl.replaceChildren(...kv(rows));
    }
  }
  for (const [name, card] of s.cards) {
    if (!seen.has(name)) { card.remove(); s.cards.delete(name); }
  }
  setText($('#svc-count'), `${details.length} service${details.length === 1 ? '' : 's'}`);
  const empty = $('#svc-empty');
  empty.hidden = details.length > 0;
  setText(empty, 'No services yet. Create one with New service.');
  ul.dataset.loaded = '1';
}
