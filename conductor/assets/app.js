/* aerekos dashboard: plain JavaScript modules, no dependencies, no build step.
 * Talks to /api/v1 with the HttpOnly session cookie that POST /login sets.
 * Views (hash routes): #/ fleet, #/workers/<id> one worker, #/services,
 * #/services/<name> one service, #/agents, #/alerts, #/settings. This module routes and boots;
 * each view has its own module, core.js holds what they share. */
import { $, setText, st, stopPolling } from './core.js';
import { agentsView } from './agents.js';
import { alertsView } from './alerts.js';
import { fleetView } from './fleet.js';
import { initLogin, showLogin } from './login.js';
import { closeLog } from './logs.js';
import { serviceView } from './service.js';
import { servicesView } from './services.js';
import { settingsView } from './settings.js';
import { workerView } from './worker.js';

function enterApp() {
  st.authed = true;
  st.cards.clear();
  $('#login-view').hidden = true;
  $('#boot').hidden = true;
  $('#top').hidden = false;
  $('#view').hidden = false;
  route();
}

// ---------- router ----------
function route() {
  if (!st.authed) return;
  stopPolling();
  st.worker = null;
  st.svcList = null;
  st.svc = null;
  st.alerts = null;
  st.agents = null;
  closeLog(true);
  st.cards.clear();
  const view = $('#view');
  view.replaceChildren();
  const hash = location.hash || '#/';
  const m = hash.match(/^#\/workers\/([^/?#]+)$/);
  const sm = hash.match(/^#\/services\/([^/?#]+)$/);
  const dec = (x) => { try { return decodeURIComponent(x); } catch (_) { return x; } };
  let nav = 'fleet';
  if (m) {
    workerView(view, dec(m[1]));
  } else if (sm) {
    nav = 'services';
    serviceView(view, dec(sm[1]));
  } else if (hash === '#/services') {
    nav = 'services';
    servicesView(view);
  } else if (hash === '#/agents') {
    nav = 'agents';
    agentsView(view);
  } else if (hash === '#/alerts') {
    nav = 'alerts';
    alertsView(view);
  } else if (hash === '#/settings') {
    nav = 'settings';
    settingsView(view);
  } else {
    fleetView(view);
  }
  for (const a of document.querySelectorAll('[data-nav]')) {
    if (a.dataset.nav === nav) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

// ---------- boot ----------
async function boot() {
  initLogin(enterApp);
  window.addEventListener('hashchange', route);
  try {
    const r = await fetch('/api/v1/session', { credentials: 'same-origin' });
    const d = await r.json();
    if (d.authenticated) enterApp();
    else showLogin('');
  } catch (_) {
    setText($('#boot'), 'Cannot reach the conductor. Reload to retry.');
  }
}
boot();
