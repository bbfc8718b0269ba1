// The Rollout section of a service page: the current rollout, starting and
// aborting one, the history.
import { $, api, AuthError, dash, enc, fmt, h, setKv, setText, st, toast } from './core.js';

// The section; `s` is the service page's state (`s.refresh` polls again).
export function rolloutPanel(s) {
  return h('section', { class: 'panel', 'aria-labelledby': 'ro-h' },
    h('h2', { id: 'ro-h', text: 'Rollout' }),
    h('dl', { class: 'kv', id: 's-ro' }),
    h('form', { id: 'ro-form', novalidate: true, onsubmit: startRollout, oninput: () => { s.roDirty = true; } },
      h('h3', { text: 'Roll out version…' }),
      h('div', { class: 'row' },
        h('div', { class: 'field' }, h('label', { for: 'ro-version', text: 'Version' }), h('select', { id: 'ro-version' })),
        h('div', { class: 'field' }, h('label', { for: 'ro-canary', text: 'Canary workers' }),
          h('input', { id: 'ro-canary', type: 'number', min: 1, step: 1, value: 1, inputmode: 'numeric' })),
        h('div', { class: 'field' }, h('label', { for: 'ro-settle', text: 'Settle (s)' }),
          h('input', { id: 'ro-settle', type: 'number', min: 0, max: 3600, step: 1, value: 10, inputmode: 'numeric' }))),
      h('div', { class: 'row' },
        h('button', { type: 'submit', class: 'primary', id: 'ro-start', text: 'Roll out' }),
        h('button', { type: 'button', class: 'danger', id: 'ro-abort', hidden: true, text: 'Abort rollout', onclick: abortRollout })),
      h('p', { class: 'error', id: 'ro-error', role: 'alert' })),
    h('h3', { text: 'History' }),
    h('table', { class: 'svc-table', id: 'ro-hist', hidden: true },
      h('thead', {}, h('tr', {}, ['#', 'Versions', 'State', 'Started'].map((t) => h('th', { text: t })))),
      h('tbody', { id: 'ro-rows' })),
    h('p', { class: 'muted small', id: 'ro-none', text: 'No rollouts yet.' }));
}

// The last rollout and the form to start one.
export function renderRollout(s, d, hosts, latest, vkey) {
  const ro = d.rollout, live = !!ro && ro.state === 'in_progress';
  const names = (ids) => (ids || []).map((id) => hosts.get(id) || id).join(', ');
  setKv($('#s-ro'), ro ? [
    ['State', ro.state.replace('_', ' ') + (live ? `, wave ${ro.wave + 1} of ${ro.waves.length}` : '')],
    ['Versions', `v${ro.from_version} → v${ro.to_version}`],
    ...ro.waves.map((w, i) => [i ? 'Wave ' + (i + 1) : 'Canaries', names(w.workers) + (w.skipped && w.skipped.length ? ` (offline: ${names(w.skipped)})` : '')]),
    ['Policy', `settle ${ro.policy.settle_s} s` + (ro.policy.timeout_s ? `, timeout ${ro.policy.timeout_s} s` : '')],
    ['Reason', ro.reason],
    ['Started', fmt.time(ro.started_ms)],
    !live && ['Finished', fmt.time(ro.finished_ms)],
  ] : [['State', 'no rollout yet']]);
  $('#ro-abort').hidden = !live;
  const rsel = $('#ro-version');
  if (rsel.dataset.key !== vkey) {
    rsel.dataset.key = vkey;
    rsel.replaceChildren(...d.versions.slice().reverse().map((v) => h('option', { value: v.version, text: 'v' + v.version })));
    s.roDirty = false;
  }
  if (!s.roDirty && latest) rsel.value = String(latest.version);
}
export function renderHistory(list) {
  $('#ro-rows').replaceChildren(...list.map((r) => {
    const td = (label, t) => h('td', { 'data-label': label, text: t || dash });
    return h('tr', { 'data-rollout': r.id }, td('#', String(r.id)), td('Versions', `v${r.from_version} → v${r.to_version}`),
      td('State', r.state.replace('_', ' ') + (r.reason ? ': ' + r.reason : '')), td('Started', fmt.time(r.started_ms)));
  }));
  $('#ro-hist').hidden = !list.length;
  $('#ro-none').hidden = !!list.length;
}
async function startRollout(ev) {
  ev.preventDefault();
  const s = st.svc, err = $('#ro-error'), canary = Number($('#ro-canary').value), settle = Number($('#ro-settle').value);
  setText(err, '');
  if (!Number.isInteger(canary) || canary < 1) { setText(err, 'Canary workers: a whole number, at least 1.'); return $('#ro-canary').focus(); }
  if (!Number.isInteger(settle) || settle < 0 || settle > 3600) { setText(err, 'Settle: 0 to 3600 seconds.'); return $('#ro-settle').focus(); }
  const version = Number($('#ro-version').value);
  try {
    const r = await api('POST', `/services/${enc(s.name)}/rollout`, { version, canary, settle_s: settle });
    if (st.svc !== s) return;
    s.roDirty = false;
    toast(`Rolling ${s.name} out from v${r.from_version} to v${r.to_version}`);
    s.refresh();
  } catch (e) {
    if (!(e instanceof AuthError)) setText(err, 'Not started: ' + e.message);
  }
}
async function abortRollout() {
  const s = st.svc;
  setText($('#ro-error'), '');
  try {
    const r = await api('POST', `/services/${enc(s.name)}/rollout/abort`, {});
    toast(`Rollout aborted: back to v${r.from_version}`);
    $('#ro-start').focus();
    s.refresh();
  } catch (e) {
    if (!(e instanceof AuthError)) setText($('#ro-error'), 'Not aborted: ' + e.message);
  }
}
