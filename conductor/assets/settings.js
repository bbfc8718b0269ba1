// The settings page (#/settings): registration token, API tokens, the admin
// password, the MQTT observer login, the remote exec and shell audit.
import { $, add, api, AuthError, copy, dash, enc, fmt, focusHeading, h, setText, toast } from './core.js';

// A read-only field with a Copy button, for a secret shown once.
export function secretBox(id, value, label) {
  const el = id === 'enrol-cmd' ? h('pre', { id, tabindex: '0', 'aria-label': label, text: value })
    : h('input', { id, readonly: true, class: 'mono', value, 'aria-label': label });
  return h('div', { class: 'secret' }, el,
    h('button', { type: 'button', 'data-copy': id, text: 'Copy', 'aria-label': 'Copy ' + label, onclick: () => copy(value) }));
}

export function settingsView(view) {
  const field = (id, label, type, auto) => h('div', { class: 'field' }, h('label', { for: id, text: label }),
    h('input', { id, type, autocomplete: auto, required: true }));
  add(view, [
    h('h1', { text: 'Settings' }),
    h('div', { class: 'stack' },
      h('section', { class: 'panel', id: 'reg-section', 'aria-labelledby': 'reg-h' },
        h('h2', { id: 'reg-h', text: 'Registration token' }),
        h('p', { class: 'muted', text: 'New workers enrol with this token. The conductor stores only its hash, so it cannot be shown again: revealing it means rotating it. Enrolled workers are not affected; the old token stops enrolling new ones.' }),
        h('p', {}, 'Current token created ', h('span', { id: 'reg-created', text: '…' }), '.'),
        h('button', { type: 'button', id: 'rotate-reg', 'aria-expanded': 'false', text: 'Rotate and show a new token…', onclick: askRotate }),
        h('div', { class: 'notice', id: 'rotate-box', hidden: true },
          h('p', { text: 'The current registration token will stop working.' }),
          h('div', { class: 'row' },
            h('button', { type: 'button', id: 'rotate-confirm', class: 'primary', text: 'Rotate now', onclick: rotate }),
            h('button', { type: 'button', id: 'rotate-cancel', text: 'Cancel', onclick: cancelRotate }))),
        h('p', { class: 'error', id: 'reg-error', role: 'alert' }),
        h('div', { id: 'reg-result', hidden: true })),
      h('section', { class: 'panel', 'aria-labelledby': 'tok-h' },
        h('h2', { id: 'tok-h', text: 'API tokens' }),
        h('p', { class: 'muted', text: 'For scripts: send Authorization: Bearer <token>. An admin token may do everything; an operator everything but tokens, the registration token, the password, remote exec and shells, agent releases; a viewer only reads.' }),
        h('table', { id: 'tokens' }, h('thead', {}, h('tr', {}, h('th', { text: 'Name' }), h('th', { text: 'Role' }), h('th', { text: 'Created' }), h('th', {}, h('span', { class: 'muted', text: 'Action' })))),
          h('tbody', { id: 'tokens-body' })),
        h('form', { class: 'row', id: 'token-form', onsubmit: createToken },
          h('div', { class: 'field' }, h('label', { for: 'token-name', text: 'New token name' }),
            h('input', { id: 'token-name', maxlength: 64, autocomplete: 'off', required: true })),
          h('div', { class: 'field' }, h('label', { for: 'token-role', text: 'Role' }),
            h('select', { id: 'token-role' }, ['admin', 'operator', 'viewer'].map((r) => h('option', { value: r, text: r })))),
          h('button', { type: 'submit', text: 'Create token' })),
        h('p', { class: 'error', id: 'token-error', role: 'alert' }),
        h('div', { id: 'token-result', hidden: true })),
      h('section', { class: 'panel', 'aria-labelledby': 'pw-h' },
        h('h2', { id: 'pw-h', text: 'Change the admin password' }),
        h('form', { id: 'password-form', onsubmit: changePassword },
          h('input', { type: 'text', name: 'username', value: 'admin', autocomplete: 'username', hidden: true }),
          h('div', { class: 'row' },
            field('pw-current', 'Current password', 'password', 'current-password'),
            field('pw-new', 'New password (8+ characters)', 'password', 'new-password'),
            field('pw-again', 'New password again', 'password', 'new-password')),
          h('div', { class: 'row' }, h('button', { type: 'submit', class: 'primary', text: 'Change password' })),
          h('p', { id: 'pw-msg', role: 'status' }))),
      h('section', { class: 'panel', 'aria-labelledby': 'audit-h' },
        h('h2', { id: 'audit-h', text: 'Remote exec and shell sessions' }),
        h('p', { class: 'muted', text: 'Every remote command and shell, newest first (the last 50): who ran what on which worker, and how it ended.' }),
        h('table', { id: 'exec-audit' }, h('thead', {}, h('tr', {}, ['Started', 'Kind', 'Worker', 'Who', 'Command', 'Outcome', 'Exit', 'Bytes'].map((t) => h('th', { text: t })))),
          h('tbody', { id: 'exec-audit-body' }))),
      h('section', { class: 'panel', 'aria-labelledby': 'mq-h' },
        h('h2', { id: 'mq-h', text: 'MQTT' }),
        h('p', { class: 'muted', text: 'Read-only observer login for MQTT Explorer (embedded broker).' }),
        h('dl', { class: 'kv', id: 'mqtt' }))),
  ]);
  document.title = 'Settings · aerekos';
  focusHeading(view);
  loadSettings().catch(showError('#reg-error'));
}

const showError = (sel) => (e) => { if (!(e instanceof AuthError)) setText($(sel), e.message); };

async function loadSettings() {
  const [reg, mq] = await Promise.all([api('GET', '/registration-token'), api('GET', '/mqtt')]);
  setText($('#reg-created'), reg.created_ms ? fmt.time(reg.created_ms) : 'at first start');
  const rows = [['Broker', mq.url], ['Username', mq.observer_username || dash], ['Password', mq.observer_password || dash], ['Topics', mq.json_mirror]];
  $('#mqtt').replaceChildren(...rows.flatMap(([k, v]) => [h('dt', { text: k }), h('dd', { class: 'mono', text: v || dash })]));
  await Promise.all([loadTokens(), loadAudit()]);
}
async function loadAudit() {
  const r = await api('GET', '/exec-sessions?limit=50');
  const list = r.sessions || [];
  $('#exec-audit-body').replaceChildren(...(list.length ? list.map((x) => h('tr', { 'data-session': x.id },
    h('td', { text: fmt.time(x.started_ms) }), h('td', { text: x.kind }),
    h('td', {}, h('a', { href: '#/workers/' + enc(x.worker_id), text: x.worker_id })),
    h('td', { text: x.token_name }),
    h('td', { class: 'mono', text: (x.argv || []).join(' ') || (x.kind === 'shell' ? '(login shell)' : dash) }),
    h('td', { text: x.outcome }), h('td', { text: x.exit_code ?? dash }), h('td', { text: x.bytes_out }))) :
    [h('tr', {}, h('td', { colspan: '8', class: 'muted', text: 'No remote sessions yet.' }))]));
}
async function loadTokens() {
  const r = await api('GET', '/tokens');
  const tokens = r.tokens || [];
  $('#tokens-body').replaceChildren(...(tokens.length ? tokens.map((t) => h('tr', { 'data-token': t.id },
    h('td', { text: t.name }), h('td', { text: t.role || 'admin' }), h('td', { text: fmt.time(t.created_ms) }),
    h('td', {}, h('button', { type: 'button', class: 'danger', text: 'Delete', 'aria-label': 'Delete token ' + t.name,
      onclick: () => deleteToken(t) })))) :
    [h('tr', {}, h('td', { colspan: '4', class: 'muted', text: 'No API tokens.' }))]));
}
async function createToken(ev) {
  ev.preventDefault();
  const name = $('#token-name').value.trim();
  setText($('#token-error'), '');
  if (!name) { setText($('#token-error'), 'Enter a name.'); $('#token-name').focus(); return; }
  try {
    const t = await api('POST', '/tokens', { name, role: $('#token-role').value });
    $('#token-name').value = '';
    const box = $('#token-result');
    box.replaceChildren(h('p', { class: 'notice', text: `Token "${t.name}" (${t.role}; shown once — copy it now):` }),
      secretBox('new-token', t.token, 'new API token'));
    box.hidden = false;
    await loadTokens();
    $('#new-token').focus();
    $('#new-token').select();
  } catch (e) { showError('#token-error')(e); }
}
async function deleteToken(t) {
  setText($('#token-error'), '');
  try {
    await api('DELETE', '/tokens/' + enc(t.id));
    toast(`Token "${t.name}" deleted`);
    await loadTokens();
    $('#token-name').focus();
  } catch (e) { showError('#token-error')(e); }
}
function askRotate() {
  $('#rotate-box').hidden = false;
  $('#rotate-reg').setAttribute('aria-expanded', 'true');
  $('#rotate-confirm').focus();
}
function cancelRotate() {
  $('#rotate-box').hidden = true;
  $('#rotate-reg').setAttribute('aria-expanded', 'false');
  $('#rotate-reg').focus();
}
async function rotate() {
  setText($('#reg-error'), '');
  $('#rotate-confirm').disabled = true;
  try {
    const r = await api('POST', '/registration-token/rotate', {});
    const origin = location.protocol + '//' + location.host;
    const cmd = `edge-worker --conductor ${origin} --token ${r.token}`;
    const local = /^(localhost|127\.|\[::1\])/.test(location.host);
    const box = $('#reg-result');
    box.replaceChildren(
      h('p', { class: 'notice', text: 'New registration token (shown once — copy it now):' }),
      secretBox('reg-token', r.token, 'registration token'),
      h('p', { text: 'Enrol a Pi (run on the Pi):' }),
      secretBox('enrol-cmd', cmd, 'enrol command'),
      local ? h('p', { class: 'muted small', text: 'This page is open on a loopback address: use an address of the conductor the Pi can reach.' }) : null);
    box.hidden = false;
    $('#rotate-box').hidden = true;
    $('#rotate-reg').setAttribute('aria-expanded', 'false');
    setText($('#reg-created'), fmt.time(r.created_ms));
    $('#reg-token').focus();
    $('#reg-token').select();
  } catch (e) {
    showError('#reg-error')(e);
  } finally {
    $('#rotate-confirm').disabled = false;
  }
}
async function changePassword(ev) {
  ev.preventDefault();
  const msg = $('#pw-msg');
  const cur = $('#pw-current').value, nw = $('#pw-new').value, again = $('#pw-again').value;
  msg.className = 'error';
  if (!cur) { setText(msg, 'Enter the current password.'); $('#pw-current').focus(); return; }
  if ([...nw].length < 8) { setText(msg, 'The new password needs at least 8 characters.'); $('#pw-new').focus(); return; }
  if (nw !== again) { setText(msg, 'The two new passwords differ.'); $('#pw-again').focus(); return; }
  try {
    const r = await api('POST', '/password', { current: cur, new: nw });
    ev.target.reset();
    msg.className = 'ok-msg';
    setText(msg, 'Password changed.' + (r.sessions_ended ? ` ${r.sessions_ended} other session(s) signed out.` : ''));
  } catch (e) {
    if (!(e instanceof AuthError)) setText(msg, e.message);
  }
}
