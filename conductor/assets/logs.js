// The log panel (one per page: a service's log on one worker, followed).
import { $, enc, h, setText, signedOut, st } from './core.js';

const LOG_KEEP = 200 * 1024; // characters kept in the panel
export function logPanel() {
  return h('section', { class: 'panel logs', id: 'log-panel', 'aria-labelledby': 'log-h', hidden: true },
    h('div', { class: 'row log-head' }, h('h2', { id: 'log-h', text: 'Log' }),
      h('span', { class: 'muted small', id: 'log-state', role: 'status' }),
      h('button', { type: 'button', id: 'log-toggle', onclick: toggleLog }),
      h('button', { type: 'button', id: 'log-close', text: 'Close', onclick: () => closeLog() })),
    h('p', { class: 'error', id: 'log-error', role: 'alert' }),
    h('pre', { class: 'log', id: 'log-text', tabindex: '0', 'aria-label': 'Log output' }));
}
export function openLog(id, host, name, opener) {
  closeLog(true);
  const L = st.log = { id, name, sel: `[data-log="${CSS.escape(opener.dataset.log)}"]`, text: '', gen: 0 };
  $('#log-panel').hidden = false;
  setText($('#log-h'), `Log of ${name} on ${host}`);
  $('#log-text').textContent = '';
  followLog(L);
  $('#log-panel').scrollIntoView({ block: 'nearest' });
  $('#log-toggle').focus();
}
function stopLog(L, state) {
  L.on = false;
  L.gen++;
  if (L.ctl) L.ctl.abort();
  setText($('#log-toggle'), 'Follow');
  setText($('#log-state'), state);
}
export function closeLog(quiet) {
  const L = st.log;
  if (!L) return;
  stopLog(L, '');
  st.log = null;
  $('#log-panel').hidden = true;
  const b = $(L.sel);
  if (!quiet && b) b.focus();
}
function toggleLog() {
  const L = st.log;
  if (L && L.on) stopLog(L, 'stopped');
  else if (L) { L.text = ''; $('#log-text').textContent = ''; followLog(L); }
}
// The last 16 KiB, then new output for 60 s at a time, until stopped.
async function followLog(L) {
  const gen = ++L.gen;
  L.on = true;
  setText($('#log-toggle'), 'Stop');
  setText($('#log-error'), '');
  let tail = 16384;
  while (st.log === L && L.gen === gen) {
    const ctl = L.ctl = new AbortController(), t0 = Date.now();
    setText($('#log-state'), 'connecting…');
    try {
      const r = await fetch(`/api/v1/workers/${enc(L.id)}/services/${enc(L.name)}/logs?tail=${tail}&follow=60`,
        { credentials: 'same-origin', signal: ctl.signal });
      if (r.status === 401) return signedOut('Your session ended. Sign in again.');
      if (!r.ok) {
        const t = await r.text();
        let m = t;
        try { m = JSON.parse(t).error; } catch (_) { /* plain text */ }
        throw new Error(m || 'HTTP ' + r.status);
      }
      setText($('#log-state'), 'following');
      const rd = r.body.getReader(), dec = new TextDecoder();
      for (let c = await rd.read(); !c.done; c = await rd.read()) appendLog(L, dec.decode(c.value, { stream: true }));
      appendLog(L, dec.decode());
    } catch (e) {
      if (ctl.signal.aborted || L.gen !== gen) return;
      setText($('#log-error'), 'Log unavailable: ' + e.message);
      return stopLog(L, '');
    }
    tail = 0; // the window ended: follow again from the end
    if (Date.now() - t0 < 5000) await new Promise((r) => setTimeout(r, 2000));
  }
}
function appendLog(L, t) {
  if (!t || st.log !== L) return;
  const pre = $('#log-text'), end = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 30;
  L.text += t;
  if (L.text.length > LOG_KEEP) {
    const cut = L.text.length - LOG_KEEP;
    L.text = L.text.slice(L.text.indexOf('\n', cut) + 1 || cut);
  }
  pre.textContent = L.text;
  if (end) pre.scrollTop = pre.scrollHeight; // follow the end unless scrolled up
}
