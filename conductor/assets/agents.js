// The agents page (#/agents): which agent versions the fleet runs, the
// signed agent releases, the agent rollout in progress (or the last one)
// with each worker's outcome, starting and aborting one, and the history.
// Releases are signed offline (`aerekos agent release`): the dashboard
// never sees the signing key, so it lists and deletes releases only.
import { $, add, api, dash, enc, fmt, focusHeading, h, rows, setKv, setText, showError, st, startPolling, table, td, toast } from './core.js';


export function agentsView(view) {
  const s = { keys: {}, hosts: new Map(), live: null, refresh: () => startPolling(pollAgents) };
  st.agents = s;
  const section = (id, title, ...kids) => h('section', { class: 'panel', id, 'aria-labelledby': id + '-h' },
    h('h2', { id: id + '-h', text: title }), ...kids);
  const num = (id, label, value, min, max) => h('div', { class: 'field' }, h('label', { for: id, text: label }),
    h('input', { id, type: 'number', min, max, step: 1, value, inputmode: 'numeric' }));
  add(view, [
    h('div', { class: 'summary' }, h('h1', { text: 'Agents' }), h('span', { class: 'muted', id: 'ag-count' })),
    h('div', { class: 'stack', id: 'agents' },
      section('ag-versions', 'Versions running',
        table('ag-ver', ['Version', 'Workers']),
        h('p', { class: 'muted small', id: 'ag-ver-empty' })),
      section('ag-rollout', 'Rollout',
        h('dl', { class: 'kv', id: 'ag-ro' }),
        table('ag-mem', ['Worker', 'Arch', 'From', 'State', 'Detail']),
        h('p', { class: 'muted small', id: 'ag-mem-empty' }),
        h('form', { id: 'ag-form', novalidate: true, onsubmit: (ev) => startRollout(ev, s) },
          h('h3', { text: 'Roll out an agent release…' }),
          h('div', { class: 'row' },
            h('div', { class: 'field' }, h('label', { for: 'ag-version', text: 'Version' }), h('select', { id: 'ag-version' })),
            num('ag-canary', 'Canary workers', 1, 1, 100000),
            num('ag-settle', 'Settle (s)', 60, 0, 3600),
            num('ag-trial', 'Trial (s)', 60, 5, 600),
            h('div', { class: 'field' }, h('label', { for: 'ag-label', text: 'Only workers labelled' }),
              h('input', { id: 'ag-label', autocomplete: 'off', spellcheck: 'false', placeholder: 'site=shop (all when empty)' }))),
          h('div', { class: 'row' },
            h('label', { class: 'check' }, h('input', { id: 'ag-downgrade', type: 'checkbox' }), ' allow a downgrade'),
            h('button', { type: 'submit', class: 'primary', id: 'ag-start', text: 'Roll out' }),
            h('button', { type: 'button', class: 'danger', id: 'ag-abort', hidden: true, text: 'Abort rollout', onclick: () => abortRollout(s) })),
          h('p', { class: 'error', id: 'ag-error', role: 'alert' }))),
      section('ag-releases', 'Releases',
        h('p', { class: 'muted small', text: 'Signed offline with aerekos agent release; a worker installs only a binary signed by the key it pinned at enrolment.' }),
        table('ag-rel', ['Version', 'Arch', 'SHA-256', 'Size', 'Registered', 'Action']),
        h('p', { class: 'muted small', id: 'ag-rel-empty' }),
        h('p', { class: 'error', id: 'ag-rel-error', role: 'alert' })),
      section('ag-history', 'History',
        table('ag-hist', ['#', 'Version', 'State', 'Updated', 'Started', 'Reason']),
        h('p', { class: 'muted small', id: 'ag-hist-empty' }))),
  ]);
  document.title = 'Agents · aerekos';
  focusHeading(view);
  startPolling(pollAgents);
}

async function pollAgents() {
  const s = st.agents;
  const [rel, ros, fleet] = await Promise.all([api('GET', '/agent-releases'), api('GET', '/agent-rollouts'), api('GET', '/workers')]);
  if (st.agents !== s) return;
  const workers = fleet.workers || [], releases = rel.releases || [], rollouts = ros.rollouts || [];
  s.hosts = new Map(workers.map((w) => [w.id, w.hostname]));
  const byVersion = new Map();
  for (const w of workers) {
    const v = w.agent_version || 'unknown';
    byVersion.set(v, (byVersion.get(v) || 0) + 1);
  }
  const versions = [...byVersion].sort((a, b) => b[1] - a[1] || String(a[0]).localeCompare(String(b[0])));
  rows(s, 'ag-ver', JSON.stringify(versions), versions, ([v, n]) => h('tr', { 'data-version': v }, td('Version', v, 'version'), td('Workers', n, 'count')),
    'No workers yet.');
  setText($('#ag-count'), `${workers.length} worker${workers.length === 1 ? '' : 's'}, ${byVersion.size} version${byVersion.size === 1 ? '' : 's'}`);
  rows(s, 'ag-rel', JSON.stringify(releases), releases, (r) => h('tr', { 'data-release': `${r.version}/${r.arch}` },
    td('Version', r.version, 'version'), td('Arch', r.arch, 'arch'), td('SHA-256', r.sha256, 'sha'),
    td('Size', fmt.bytes(r.size)), td('Registered', fmt.time(r.created_ms)),
    h('td', { 'data-label': 'Action' }, h('button', { type: 'button', class: 'danger', text: 'Delete',
      'aria-label': `Delete agent release ${r.version} for ${r.arch}`, onclick: () => deleteRelease(s, r) }))),
  'No agent releases registered.');
  // The version picker: every released version, newest registration first.
  const offered = [...new Set(releases.slice().sort((a, b) => b.created_ms - a.created_ms).map((r) => r.version))];
  const sel = $('#ag-version'), key = JSON.stringify(offered);
  if (s.keys.picker !== key) {
    s.keys.picker = key;
    const keep = sel.value;
    sel.replaceChildren(...offered.map((v) => h('option', { value: v, text: v })));
    if (offered.includes(keep)) sel.value = keep;
  }
  $('#ag-start').disabled = !offered.length;
  renderRollout(s, rollouts[0] || null);
  rows(s, 'ag-hist', JSON.stringify(rollouts.map(({ members, ...r }) => r)), rollouts, (r) => h('tr', { 'data-rollout': r.id, 'data-state': r.state },
    td('#', r.id), td('Version', r.version, 'version'), td('State', r.state.replace('_', ' '), 'state'),
    td('Updated', `${r.counts.updated || 0} of ${(r.members || []).length}`), td('Started', fmt.time(r.started_ms)), td('Reason', r.reason, 'reason')),
  'No agent rollouts yet.');
  $('#agents').dataset.loaded = '1';
}

function renderRollout(s, ro) {
  const live = !!ro && ro.state === 'in_progress';
  s.live = live ? ro : null;
  const names = (ids) => (ids || []).map((id) => s.hosts.get(id) || id).join(', ') || dash;
  setKv($('#ag-ro'), ro ? [
    ['State', ro.state.replace('_', ' ') + (live ? `, wave ${ro.wave + 1} of ${ro.waves.length}` : '')],
    ['Version', ro.version],
    ...ro.waves.map((w, i) => [i ? 'Wave ' + (i + 1) : 'Canaries', names(w.workers) + (w.skipped && w.skipped.length ? ` (offline: ${names(w.skipped)})` : '')]),
    ['Policy', `trial ${ro.policy.trial_s} s, settle ${ro.policy.settle_s} s` + (ro.policy.timeout_s ? `, timeout ${ro.policy.timeout_s} s` : '')
      + (ro.policy.allow_downgrade ? ', downgrade allowed' : '')],
    ['Reason', ro.reason],
    ['Started', fmt.time(ro.started_ms)],
    !live && ['Finished', fmt.time(ro.finished_ms)],
  ] : [['State', 'no agent rollout yet']]);
  const members = ro ? ro.members : [];
  rows(s, 'ag-mem', JSON.stringify([members, [...s.hosts]]), members, (m) => h('tr', { 'data-worker': m.worker_id, 'data-state': m.state },
    h('td', { 'data-label': 'Worker', 'data-col': 'worker' }, h('a', { href: '#/workers/' + enc(m.worker_id), text: s.hosts.get(m.worker_id) || m.worker_id })),
    td('Arch', m.arch), td('From', m.from_version), td('State', m.state, 'state'), td('Detail', m.detail, 'detail')),
  ro ? 'Nobody to update.' : '');
  $('#ag-abort').hidden = !live;
}

async function startRollout(ev, s) {
  ev.preventDefault();
  const err = '#ag-error', btn = $('#ag-start');
  setText($(err), '');
  const int = (id) => Number($(id).value);
  const version = $('#ag-version').value, canary = int('#ag-canary'), settle = int('#ag-settle'), trial = int('#ag-trial');
  if (!version) return setText($(err), 'Register a release first (aerekos agent release).');
  if (!Number.isInteger(canary) || canary < 1) { setText($(err), 'Canary workers: a whole number, at least 1.'); return $('#ag-canary').focus(); }
  if (!Number.isInteger(settle) || settle < 0 || settle > 3600) { setText($(err), 'Settle: 0 to 3600 seconds.'); return $('#ag-settle').focus(); }
  if (!Number.isInteger(trial) || trial < 5 || trial > 600) { setText($(err), 'Trial: 5 to 600 seconds.'); return $('#ag-trial').focus(); }
  const body = { version, canary, settle_s: settle, trial_s: trial };
  const label = $('#ag-label').value.trim();
  if (label) {
    const i = label.indexOf('=');
    if (i < 1) { setText($(err), 'Label: key=value, e.g. site=shop.'); return $('#ag-label').focus(); }
    body.selector = { [label.slice(0, i)]: label.slice(i + 1) };
  }
  if ($('#ag-downgrade').checked) body.allow_downgrade = true;
  btn.disabled = true;
  try {
    const r = await api('POST', '/agent-rollouts', body);
    toast(`Agent rollout ${r.id} of ${r.version} started`);
    s.refresh();
  } catch (e) {
    showError(err, 'Not started: ')(e);
  } finally {
    btn.disabled = false;
  }
}

async function abortRollout(s) {
  if (!s.live) return;
  setText($('#ag-error'), '');
  try {
    await api('POST', `/agent-rollouts/${s.live.id}/abort`, {});
    toast(`Agent rollout ${s.live.id} aborted`);
    s.refresh();
  } catch (e) {
    showError('#ag-error', 'Not aborted: ')(e);
  }
}

async function deleteRelease(s, r) {
  setText($('#ag-rel-error'), '');
  try {
    await api('DELETE', `/agent-releases/${enc(r.version)}/${enc(r.arch)}`);
    toast(`Agent release ${r.version} for ${r.arch} deleted`);
    s.refresh();
  } catch (e) {
    showError('#ag-rel-error', 'Not deleted: ')(e);
  }
}
