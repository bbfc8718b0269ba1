// One service's page (#/services/<name>): per-worker state and actions,
// deployment, rollout, spec, events.
import { $, add, api, AuthError, dash, enc, fmt, focusHeading, h, kv, ok, place, setBadge, setText, st, startPolling, stopPolling, toast } from './core.js';
import { logPanel, openLog } from './logs.js';
import { renderHistory, renderRollout, rolloutPanel } from './rollouts.js';
import { healthText, kindOf, latestSpec, limitsText, OPS, pairs, placement, portText, program, quote, stateBadge, svcSummary, volText } from './services.js';

export function serviceView(view, name) {
  const s = { name, rows: new Map(), dirty: false, fleetKey: null, data: null, busy: new Set(), refresh: () => startPolling(pollService) };
  st.svc = s;
  const sel = (id, opts) => h('select', { id }, opts.map(([v, t]) => h('option', { value: v, text: t })));
  add(view, [
    h('p', { class: 'crumbs' }, h('a', { href: '#/services', text: '← Services' })),
    h('div', { class: 'title' }, h('h1', { id: 's-name', text: name }), h('span', { class: 'badge', id: 's-badge' }),
      h('span', { class: 'muted small', id: 's-count' })),
    h('p', { class: 'meta', id: 's-meta' }),
    h('p', { class: 'error', id: 's-error', role: 'alert' }),
    h('section', { class: 'panel', 'aria-labelledby': 'sw-h' },
      h('h2', { id: 'sw-h', text: 'Workers' }),
      h('table', { class: 'svc-table', id: 's-workers' },
        h('thead', {}, h('tr', {}, ['Worker', 'Desired', 'State', 'Version', 'PID', 'Restarts', 'Last exit', 'Detail', 'Metrics', 'Actions']
          .map((t) => h('th', { text: t })))),
        h('tbody', { id: 's-rows' })),
      h('p', { class: 'muted small', id: 's-rows-empty' }),
      h('p', { class: 'muted small', id: 's-op', role: 'status' })),
    logPanel(),
    h('div', { class: 'cols' },
      h('section', { class: 'panel', 'aria-labelledby': 'dep-h' },
        h('h2', { id: 'dep-h', text: 'Deployment' }),
        h('dl', { class: 'kv', id: 's-dep' }),
        h('form', { id: 'deploy-form', novalidate: true, onsubmit: deploy, oninput: () => { s.dirty = true; }, onchange: () => { s.dirty = true; } },
          h('fieldset', { class: 'checks', id: 'deploy-workers' }, h('legend', { text: 'Workers' })),
          h('div', { class: 'row' },
            h('div', { class: 'field wide' }, h('label', { for: 'deploy-labels', text: 'Labels (every worker with all of them)' }),
              h('input', { id: 'deploy-labels', autocomplete: 'off', spellcheck: 'false', placeholder: 'role=sensor site=shop', 'aria-describedby': 'deploy-labels-hint' }),
              h('span', { class: 'muted small', id: 'deploy-labels-hint', text: 'key=value, separated by spaces or commas' }))),
          h('div', { class: 'row' },
            h('div', { class: 'field' }, h('label', { for: 'deploy-version', text: 'Version' }), sel('deploy-version', [])),
            h('div', { class: 'field' }, h('label', { for: 'deploy-state', text: 'Desired state' }),
              sel('deploy-state', [['running', 'running'], ['stopped', 'stopped']]))),
          h('div', { class: 'row' },
            h('button', { type: 'submit', class: 'primary', id: 'deploy', text: 'Deploy' }),
            h('button', { type: 'button', class: 'danger', id: 'undeploy', 'aria-expanded': 'false', hidden: true, text: 'Undeploy…', onclick: askUndeploy })),
          h('div', { class: 'notice', id: 'undeploy-box', hidden: true },
            h('p', { id: 'undeploy-text' }),
            h('div', { class: 'row' },
              h('button', { type: 'button', class: 'primary', id: 'undeploy-confirm', text: 'Undeploy now', onclick: undeploy }),
              h('button', { type: 'button', id: 'undeploy-cancel', text: 'Cancel', onclick: cancelUndeploy }))),
          h('p', { class: 'error', id: 'deploy-error', role: 'alert' }))),
      rolloutPanel(s),
      h('section', { class: 'panel', 'aria-labelledby': 'spec-h' },
        h('h2', { id: 'spec-h', text: 'Spec' }),
        h('dl', { class: 'kv', id: 's-spec' }),
        h('div', { class: 'row' }, h('button', { type: 'button', id: 'new-version', text: 'New version…', onclick: newVersion }))),
      h('section', { class: 'panel', 'aria-labelledby': 'sev-h' }, h('h2', { id: 'sev-h', text: 'Recent events' }),
        h('ul', { class: 'events', id: 's-events' }))),
  ]);
  document.title = name + ' · aerekos';
  focusHeading(view);
  startPolling(pollService);
}

async function pollService() {
  const s = st.svc;
  if (!s) return;
  let d;
  try {
    d = await api('GET', '/services/' + enc(s.name));
  } catch (e) {
    if (e.status !== 404 || st.svc !== s) throw e;
    stopPolling();
    $('#view').replaceChildren(h('p', { class: 'crumbs' }, h('a', { href: '#/services', text: '← Services' })),
      h('h1', { text: 'Service not found' }), h('p', { class: 'muted', text: `No service is named ${s.name}.` }));
    return;
  }
  const fleet = await api('GET', '/workers'), ro = d.rollout;
  const rkey = ro ? `${ro.id}:${ro.state}:${ro.wave}` : '';
  const hist = rkey === s.roKey ? null : ro ? (await api('GET', `/services/${enc(s.name)}/rollouts`)).rollouts : [];
  if (st.svc !== s) return;
  s.data = d;
  renderService(s, d, fleet.workers || []);
  if (hist) { s.roKey = rkey; renderHistory(hist); }
}

function renderService(s, d, fleet) {
  const hosts = new Map(fleet.map((w) => [w.id, w.hostname]));
  const dep = d.deployment, sum = svcSummary(d), latest = latestSpec(d);
  const b = $('#s-badge');
  b.className = 'badge ' + sum.cls;
  setText(b, sum.label);
  setText($('#s-count'), sum.text);
  setText($('#s-meta'), `${kindOf(latest && latest.spec)} · ${d.versions.length} version${d.versions.length === 1 ? '' : 's'} · ${placement(dep, hosts)}`);

  // Per-worker rows, keyed by worker id (kept across polls so focus stays on a button).
  const tbody = $('#s-rows'), seen = new Set();
  const rows = (d.workers || []).concat((d.untargeted || []).map((u) => ({ worker_id: u.worker_id, actual: u.actual, untargeted: true })));
  for (const [i, r] of rows.entries()) {
    const id = r.worker_id, host = r.hostname || hosts.get(id) || id;
    seen.add(id);
    let tr = s.rows.get(id);
    if (!tr) {
      const td = (col, label, ...kids) => h('td', { 'data-col': col, 'data-label': label }, ...kids);
      tr = h('tr', { 'data-worker': id },
        td('worker', 'Worker', h('a', { href: '#/workers/' + enc(id) })), td('desired', 'Desired'),
        td('state', 'State', h('span', { class: 'badge' })), td('version', 'Version'), td('pid', 'PID'),
        td('restarts', 'Restarts'), td('exit', 'Last exit'), td('detail', 'Detail'), td('metrics', 'Metrics'),
        td('actions', 'Actions', h('div', { class: 'btns' }, Object.entries(OPS).map(([op, t]) =>
          h('button', { type: 'button', 'data-op': op, text: t, onclick: () => workerOp(id, op) })),
        h('button', { type: 'button', 'data-log': id, text: 'Logs',
          onclick: (ev) => openLog(id, $('[data-col=worker] a', tr).textContent, s.name, ev.currentTarget) }))));
      s.rows.set(id, tr);
    }
    place(tbody, tr, i);
    const a = r.actual, cell = (c) => $(`[data-col=${c}]`, tr);
    setText($('a', cell('worker')), host);
    setText(cell('desired'), r.untargeted ? 'remove' : `${r.desired_state} v${r.desired_version}` + (r.worker_status && r.worker_status !== 'online' ? ` (worker ${r.worker_status})` : ''));
    stateBadge($('.badge', cell('state')), a);
    setText(cell('version'), a ? 'v' + a.version : dash);
    setText(cell('pid'), a && a.pid ? String(a.pid) : dash);
    setText(cell('restarts'), a ? String(a.restarts) : dash);
    setText(cell('exit'), a && ok(a.exit_code) ? String(a.exit_code) : dash);
    setText(cell('detail'), (a && a.detail) || dash);
    setText(cell('metrics'), (a && pairs(a.metrics)) || dash);
    tr.dataset.state = a ? a.state : '';
    cell('actions').hidden = !!r.untargeted;
    for (const btn of tr.querySelectorAll('button')) {
      btn.setAttribute('aria-label', `${OPS[btn.dataset.op] || 'Logs of'} ${s.name} on ${host}`);
    }
  }
  for (const [id, tr] of s.rows) {
    if (!seen.has(id)) { tr.remove(); s.rows.delete(id); }
  }
  $('#s-workers').hidden = !rows.length;
  setText($('#s-rows-empty'), rows.length ? '' : dep ? 'No worker matches the placement.' : 'Not deployed: choose workers or labels below.');

  // Deployment summary and form.
  $('#s-dep').replaceChildren(...kv(dep ? [
    ['Version', 'v' + dep.version], ['Desired', dep.desired_state],
    ['Workers', (dep.workers || []).map((id) => hosts.get(id) || id).join(', ')],
    ['Labels', Object.entries(dep.labels || {}).map(([k, v]) => k + '=' + v).join(' ')],
    ['Changed', fmt.time(dep.updated_ms)],
  ] : [['State', 'not deployed']]));
  $('#undeploy').hidden = !dep;
  if (!dep) $('#undeploy-box').hidden = true;
  const boxes = $('#deploy-workers');
  const avail = fleet.filter((w) => !w.revoked || (dep && dep.workers.includes(w.id)));
  const fkey = avail.map((w) => w.id + ' ' + w.hostname).join('\n');
  if (fkey !== s.fleetKey) {
    s.fleetKey = fkey;
    const checked = new Set([...boxes.querySelectorAll('input:checked')].map((i) => i.value));
    boxes.replaceChildren(h('legend', { text: 'Workers' }), ...(avail.length ? avail.map((w) =>
      h('label', { class: 'check' }, h('input', { type: 'checkbox', name: 'deploy-worker', value: w.id, checked: checked.has(w.id) }),
        h('span', { text: w.hostname }), h('span', { class: 'badge', 'data-w': w.id }))) :
      [h('span', { class: 'muted small', text: 'No workers enrolled.' })]));
  }
  for (const w of avail) {
    const el = boxes.querySelector(`[data-w="${CSS.escape(w.id)}"]`);
    if (el) setBadge(el, w);
  }
  const vsel = $('#deploy-version');
  const vkey = d.versions.map((v) => v.version).join();
  if (vsel.dataset.key !== vkey) {
    vsel.dataset.key = vkey;
    const keep = vsel.value;
    vsel.replaceChildren(...d.versions.slice().reverse().map((v, i) =>
      h('option', { value: v.version, text: `v${v.version}` + (i ? '' : ' (latest)') })));
    if (keep && s.dirty) vsel.value = keep;
  }
  if (!s.dirty) {
    for (const i of boxes.querySelectorAll('input')) i.checked = !!dep && dep.workers.includes(i.value);
    $('#deploy-labels').value = dep ? Object.entries(dep.labels || {}).map(([k, v]) => k + '=' + v).join(' ') : '';
    vsel.value = String(dep ? dep.version : latest ? latest.version : '');
    $('#deploy-state').value = dep ? dep.desired_state : 'running';
  }

  // Spec (the latest version).
  if (latest) {
    const sp = latest.spec || {};
    const skey = latest.version + ':' + (dep ? dep.version : '');
    if ($('#s-spec').dataset.key !== skey) {
      $('#s-spec').dataset.key = skey;
      const c = kindOf(sp) === 'container';
      $('#s-spec').replaceChildren(...kv([
        ['Version', `v${latest.version} (latest)` + (dep && dep.version !== latest.version ? ` · v${dep.version} deployed` : '')],
        ['Kind', kindOf(sp)],
        c ? ['Image', sp.image, 'mono'] : sp.command ? ['Command', sp.command, 'mono'] : ['Artifacts', program(sp), 'mono'],
        [c ? 'Command override' : 'Arguments', (sp.args || []).map(quote).join(' '), 'mono'],
        c && ['Ports', (sp.ports || []).map(portText).join(' '), 'mono'],
        c && ['Volumes', (sp.volumes || []).map(volText).join(' '), 'mono'],
        ['Environment', pairs(sp.env), 'mono'],
        !c && ['Working dir', sp.working_dir || 'the service\'s own directory'],
        ['Health check', healthText(sp.health)],
        ['Limits', limitsText(sp.limits || {})],
        ['Config', Object.keys(sp.config || {}).join(', '), 'mono'],
        ['Secrets', (sp.secrets || []).join(', '), 'mono'],
        ['Restart', `${sp.restart}, at most ${sp.max_restarts} in ${sp.restart_window_s} s`],
        ['Backoff', `${sp.backoff_ms} ms, doubling`],
        ['Created', fmt.time(latest.created_ms)],
      ]));
    }
  }

  // The last rollout and the form to start one.
  renderRollout(s, d, hosts, latest, vkey);

  // Recent events about the service, newest first.
  const ev = d.events || [], ekey = JSON.stringify(ev);
  if (s.evKey !== ekey) {
    s.evKey = ekey;
    $('#s-events').replaceChildren(...(ev.length ? ev.map((e) => h('li', {},
      h('span', { class: 'muted', text: `${fmt.time(e.received_at_ms)} ${hosts.get(e.worker_id) || e.worker_id} ` }), e.kind + ': ' + e.detail)) :
      [h('li', { class: 'muted', text: 'No events about this service since the conductor started.' })]));
  }
}

async function workerOp(id, op) {
  const s = st.svc;
  if (!s || s.busy.has(id)) return;
  const tr = s.rows.get(id), host = tr ? $('[data-col=worker] a', tr).textContent : id;
  s.busy.add(id);
  if (tr) tr.setAttribute('aria-busy', 'true');
  setText($('#s-error'), '');
  setText($('#s-op'), `${OPS[op]} ${s.name} on ${host}: waiting for the worker…`);
  try {
    const r = await api('POST', `/workers/${enc(id)}/services/${enc(s.name)}/${op}`, {});
    if (st.svc !== s) return;
    const msg = `${OPS[op]} ${s.name} on ${host}: ${r.status}${r.detail ? ' (' + r.detail + ')' : ''}`;
    if (r.status === 'ok') setText($('#s-op'), msg + `, ${r.round_trip_ms} ms`);
    else { setText($('#s-op'), ''); setText($('#s-error'), msg); }
  } catch (e) {
    if (st.svc !== s || e instanceof AuthError) return;
    setText($('#s-op'), '');
    setText($('#s-error'), `${OPS[op]} ${s.name} on ${host} failed: ${e.message}`);
  } finally {
    s.busy.delete(id);
    if (tr) tr.removeAttribute('aria-busy');
  }
  if (st.svc === s) startPolling(pollService);
}

async function deploy(ev) {
  ev.preventDefault();
  const s = st.svc, err = $('#deploy-error');
  if (!s) return;
  setText(err, '');
  const workers = [...document.querySelectorAll('input[name=deploy-worker]:checked')].map((i) => i.value);
  const labels = {};
  for (const t of $('#deploy-labels').value.split(/[\s,]+/).filter(Boolean)) {
    const eq = t.indexOf('=');
    if (eq < 1) { setText(err, `Label "${t}" is not key=value.`); $('#deploy-labels').focus(); return; }
    labels[t.slice(0, eq)] = t.slice(eq + 1);
  }
  if (!workers.length && !Object.keys(labels).length) {
    setText(err, 'Choose at least one worker or enter a label.');
    const first = $('input[name=deploy-worker]');
    (first || $('#deploy-labels')).focus();
    return;
  }
  const body = { workers, labels, desired_state: $('#deploy-state').value };
  if ($('#deploy-version').value) body.version = Number($('#deploy-version').value);
  const btn = $('#deploy');
  btn.disabled = true;
  try {
    const r = await api('PUT', `/services/${enc(s.name)}/deployment`, body);
    if (st.svc !== s) return;
    s.dirty = false;
    const n = (r.targets || []).length;
    toast(`${s.name} v${r.deployment.version} deployed to ${n} worker${n === 1 ? '' : 's'}`);
    startPolling(pollService);
  } catch (e) {
    if (!(e instanceof AuthError)) setText(err, 'Not deployed: ' + e.message);
  } finally {
    btn.disabled = false;
  }
}
function askUndeploy() {
  const s = st.svc;
  const n = s && s.data ? (s.data.workers || []).length : 0;
  setText($('#undeploy-text'), `Stop ${s.name} and remove it from ${n} worker${n === 1 ? '' : 's'}? The spec is kept.`);
  $('#undeploy-box').hidden = false;
  $('#undeploy').setAttribute('aria-expanded', 'true');
  $('#undeploy-confirm').focus();
}
function cancelUndeploy() {
  $('#undeploy-box').hidden = true;
  $('#undeploy').setAttribute('aria-expanded', 'false');
  $('#undeploy').focus();
}
async function undeploy() {
  const s = st.svc;
  if (!s) return;
  setText($('#deploy-error'), '');
  $('#undeploy-confirm').disabled = true;
  try {
    const r = await api('DELETE', `/services/${enc(s.name)}/deployment`);
    if (st.svc !== s) return;
    s.dirty = false;
    $('#undeploy-box').hidden = true;
    $('#undeploy').setAttribute('aria-expanded', 'false');
    const n = (r.removing_from || []).length;
    toast(`${s.name} undeployed; removing it from ${n} worker${n === 1 ? '' : 's'}`);
    $('#deploy').focus();
    startPolling(pollService);
  } catch (e) {
    if (!(e instanceof AuthError)) setText($('#deploy-error'), 'Not undeployed: ' + e.message);
  } finally {
    $('#undeploy-confirm').disabled = false;
  }
}
function newVersion() {
  const s = st.svc, latest = s && s.data ? latestSpec(s.data) : null;
  if (!latest) return;
  st.prefill = Object.assign({ name: s.name }, latest.spec);
  location.hash = '#/services';
}
