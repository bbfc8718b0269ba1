// The sign-in form, signing out, and what a 401 does.
import { $, setSignedOutHandler, setText, st, stopPolling } from './core.js';
import { closeLog } from './logs.js';

let enter = () => {}; // app.js: shows the app and routes

// Wires the form and the Log out button; `onEnter` runs once signed in.
export function initLogin(onEnter) {
  enter = onEnter;
  setSignedOutHandler(signedOut);
  $('#login-form').addEventListener('submit', onLogin);
  $('#logout').addEventListener('click', onLogout);
}

export function showLogin(message) {
  stopPolling();
  st.authed = false;
  st.worker = null;
  st.svcList = null;
  st.svc = null;
  closeLog(true);
  $('#top').hidden = true;
  $('#view').hidden = true;
  $('#view').replaceChildren();
  $('#boot').hidden = true;
  $('#login-view').hidden = false;
  setText($('#login-error'), message || '');
  document.title = 'Sign in · aerekos';
  $('#login-pass').value = '';
  $('#login-pass').focus();
}
function signedOut(message) {
  if (st.authed) showLogin(message);
}
async function onLogin(ev) {
  ev.preventDefault();
  const f = ev.target, err = $('#login-error'), btn = $('button[type=submit]', f);
  const username = f.elements.username.value.trim(), password = f.elements.password.value;
  setText(err, '');
  if (!username || !password) {
    setText(err, 'Enter the username and the password.');
    (username ? f.elements.password : f.elements.username).focus();
    return;
  }
  btn.disabled = true;
  try {
    const r = await fetch('/api/v1/login', {
      method: 'POST',
      credentials: 'same-origin',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ username, password }),
    });
    if (r.ok) {
      f.elements.password.value = '';
      enter();
    } else {
      const d = await r.json().catch(() => ({}));
      setText(err, r.status === 429 ? 'Too many attempts; wait a minute.' : d.error || 'Sign-in failed.');
      f.elements.password.select();
    }
  } catch (_) {
    setText(err, 'Cannot reach the conductor.');
  } finally {
    btn.disabled = false;
  }
}
async function onLogout() {
  stopPolling();
  await st.inflight;
  try {
    await fetch('/api/v1/logout', { method: 'POST', credentials: 'same-origin' });
  } catch (_) { /* signed out locally anyway */ }
  showLogin('Signed out.');
}
