/* aerekos dashboard: plain JavaScript, no dependencies, no build step.
 * Talks to /api/v1 with the HttpOnly session cookie that POST /login sets.
 * Views (hash routes): #/ fleet, #/workers/<id> one worker, #/services,
 * #/services/<name> one service, #/settings. */
(() => {
  'use strict';

  const POLL_MS = 2000; // every live view refreshes at this period
  const SPARK_POINTS = 60; // fleet sparklines: newest samples kept
  const SPARK_SPAN_MS = 5 * 60000; // history loaded for a sparkline
  const CHART_POINTS = 300; // points drawn per chart series
  const W = 600, H = 130; // chart viewBox
  const SVG_NS = 'http://www.w3.org/2000/svg';
  const RANGES = {
    live: { label: 'Live 5 min', ms: 5 * 60000, res: 'raw', x0: '−5 min' },
    h1: { label: '1 h', ms: 3600000, res: 'raw', x0: '−1 h' },
    h24: { label: '24 h', ms: 86400000, res: 'minute', x0: '−24 h' },
    d7: { label: '7 d', ms: 7 * 86400000, res: 'minute', x0: '−7 d' },
  };

  const st = {
    authed: false,
    pollGen: 0,
    timer: 0,
    inflight: Promise.resolve(),
    skew: 0, // conductor clock minus browser clock, ms
    filter: { q: '', status: '', label: '' },
    spark: new Map(), // worker id -> { pts: [{t, v}], loaded }
    cards: new Map(), // worker id -> card element
    labelOpts: '',
    worker: null, // state of the worker page
    svcList: null, // state of the services page
    svc: null, // state of the service page
    log: null, // the open log panel's stream
    prefill: null, // spec copied into the new-service form ("New version…")
  };

  // ---------- DOM helpers (textContent only: nothing is parsed as HTML) ----------
  const $ = (sel, root) => (root || document).querySelector(sel);
  function attrs(el, a) {
    for (const [k, v] of Object.entries(a || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'text') el.textContent = v;
      else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    return el;
  }
  function add(el, kids) {
    for (const k of kids.flat()) {
      if (k !== null && k !== undefined && k !== false) el.append(k instanceof Node ? k : String(k));
    }
    return el;
  }
  const h = (tag, a, ...kids) => add(attrs(document.createElement(tag), a), kids);
  const svg = (tag, a, ...kids) => add(attrs(document.createElementNS(SVG_NS, tag), a), kids);
  const setText = (el, t) => { if (el && el.textContent !== t) el.textContent = t; };
  const enc = encodeURIComponent;

  // ---------- API ----------
  class AuthError extends Error {}
  async function api(method, path, body) {
    const init = { method, credentials: 'same-origin', headers: { Accept: 'application/json' } };
    if (body instanceof Blob) init.body = body; // a file upload, sent raw
    else if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const r = await fetch('/api/v1' + path, init);
    if (r.status === 401) {
      signedOut('Your session ended. Sign in again.');
      throw new AuthError('signed out');
    }
    const text = await r.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch (_) { data = { error: text }; }
    }
    if (!r.ok) {
      const e = new Error((data && data.error) || 'HTTP ' + r.status);
      e.status = r.status;
      throw e;
    }
    if (data && typeof data.now_ms === 'number') st.skew = data.now_ms - Date.now();
    return data;
  }
  const now = () => Date.now() + st.skew;

  // ---------- formatting ----------
  const dash = '–';
  const ok = (v) => v !== null && v !== undefined && Number.isFinite(v);
  const fmt = {
    pct: (v) => (ok(v) ? (v >= 10 || v === 0 ? v.toFixed(0) : v.toFixed(1)) + '%' : dash),
    bytes(v) {
      if (!ok(v)) return dash;
      const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
      let i = 0;
      while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
      return (i && v < 10 ? v.toFixed(1) : v.toFixed(0)) + ' ' + u[i];
    },
    rate: (v) => (ok(v) ? fmt.bytes(v) + '/s' : dash),
    temp: (v) => (ok(v) ? v.toFixed(1) + ' °C' : dash),
    ago(ms) {
      if (!ok(ms)) return 'never';
      const s = Math.max(0, Math.round((now() - ms) / 1000));
      if (s < 60) return s + ' s ago';
      if (s < 3600) return Math.floor(s / 60) + ' min ago';
      if (s < 86400) return Math.floor(s / 3600) + ' h ago';
      return Math.floor(s / 86400) + ' d ago';
    },
    dur(s) {
      if (!ok(s)) return dash;
      const d = Math.floor(s / 86400), hr = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
      return d ? `${d} d ${hr} h` : hr ? `${hr} h ${m} min` : `${m} min`;
    },
    time: (ms) => (ok(ms) ? new Date(ms).toLocaleString() : dash),
  };
  const sum = (arr, f) => (arr || []).reduce((a, x) => a + f(x), 0);

  // One sample, whatever its source, as plain numbers.
  function fromRaw(m) {
    const dt = sum(m.disks, (d) => d.total), du = sum(m.disks, (d) => d.used);
    const temps = (m.temperatures || []).map((t) => t.millicelsius / 1000);
    return {
      cpu: m.cpu_total / 100,
      cores: (m.cpu_per_core || []).map((c) => c / 100),
      mem: m.memory_total ? (100 * m.memory_used) / m.memory_total : null,
      memUsed: m.memory_used, memTotal: m.memory_total,
      disk: dt ? (100 * du) / dt : null, diskUsed: du, diskTotal: dt,
      rx: sum(m.net, (n) => n.rx_bps), tx: sum(m.net, (n) => n.tx_bps),
      temp: temps.length ? Math.max(...temps) : null,
    };
  }
  function fromMinute(r) {
    return {
      cpu: r.cpu_avg_percent, cpuMax: r.cpu_max_percent, cores: null,
      mem: r.mem_total ? (100 * r.mem_used_avg) / r.mem_total : null,
      memUsed: r.mem_used_avg, memTotal: r.mem_total,
      disk: r.disk_total ? (100 * r.disk_used) / r.disk_total : null,
      diskUsed: r.disk_used, diskTotal: r.disk_total,
      rx: r.rx_bps_avg, tx: r.tx_bps_avg, temp: r.temp_max_celsius,
    };
  }
  function fromSummary(s) {
    return {
      cpu: s.cpu_percent,
      mem: s.memory_total ? (100 * s.memory_used) / s.memory_total : null,
      memUsed: s.memory_used, memTotal: s.memory_total,
      disk: s.disk_total ? (100 * s.disk_used) / s.disk_total : null,
      diskUsed: s.disk_used, diskTotal: s.disk_total,
      temp: s.temp_max_celsius,
    };
  }
  const rawPoint = (p) => ({ t: p.received_at_ms, v: fromRaw(p.metrics) });

  function badge(w) {
    const s = w.revoked ? 'revoked' : w.status || 'offline';
    return h('span', { class: 'badge ' + s, text: s });
  }
  function setBadge(el, w) {
    const s = w.revoked ? 'revoked' : w.status || 'offline';
    el.className = 'badge ' + s;
    setText(el, s);
  }

  // ---------- polling ----------
  function stopPolling() {
    st.pollGen++;
    clearTimeout(st.timer);
  }
  function startPolling(fn) {
    stopPolling();
    const gen = st.pollGen;
    const tick = async () => {
      if (gen !== st.pollGen || !st.authed) return;
      const started = Date.now();
      if (!document.hidden) {
        let done;
        st.inflight = new Promise((r) => { done = r; });
        try {
          await fn();
          setConn('');
        } catch (e) {
          if (!(e instanceof AuthError)) setConn('Connection problem (' + e.message + '), retrying…');
        } finally {
          done();
        }
      }
      if (gen === st.pollGen && st.authed) {
        st.timer = setTimeout(tick, Math.max(0, POLL_MS - (Date.now() - started)));
      }
    };
    tick();
  }
  const setConn = (t) => setText($('#conn'), t);

  let toastTimer = 0;
  function toast(text) {
    const t = $('#toast');
    t.textContent = text;
    t.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { t.hidden = true; }, 2500);
  }
  async function copy(text) {
    try {
      if (navigator.clipboard && window.isSecureContext) {
        await navigator.clipboard.writeText(text);
      } else {
        const ta = h('textarea', { readonly: true, class: 'offscreen' });
        ta.value = text;
        document.body.append(ta);
        ta.select();
        document.execCommand('copy');
        ta.remove();
      }
      toast('Copied');
    } catch (_) {
      toast('Copy failed: select the text and copy it by hand');
    }
  }

  // ---------- login / logout ----------
  function showLogin(message) {
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
  function enterApp() {
    st.authed = true;
    st.cards.clear();
    $('#login-view').hidden = true;
    $('#boot').hidden = true;
    $('#top').hidden = false;
    $('#view').hidden = false;
    route();
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
        enterApp();
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

  // ---------- router ----------
  function route() {
    if (!st.authed) return;
    stopPolling();
    st.worker = null;
    st.svcList = null;
    st.svc = null;
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
  // After a navigation, focus moves to the new page's heading (screen readers
  // announce it; Tab continues from there).
  function focusHeading(view) {
    const h1 = $('h1', view);
    if (h1) {
      h1.setAttribute('tabindex', '-1');
      h1.focus({ preventScroll: true });
    }
  }

  // ---------- sparklines ----------
  function spark(label) {
    return svg('svg', { class: 'spark', viewBox: '0 0 100 22', preserveAspectRatio: 'none', 'aria-hidden': 'true', 'data-spark': label },
      svg('polyline', { 'vector-effect': 'non-scaling-stroke', points: '' }));
  }
  function drawSpark(el, pts, key, fixed) {
    const vals = pts.filter((p) => ok(p.v[key]));
    const line = el.firstChild;
    el.setAttribute('data-points', String(vals.length));
    if (vals.length < 2) { line.setAttribute('points', ''); return; }
    let lo = 0, hi = 100;
    if (!fixed) {
      lo = Math.min(...vals.map((p) => p.v[key]));
      hi = Math.max(...vals.map((p) => p.v[key]));
      const pad = Math.max(1, (hi - lo) * 0.2);
      lo -= pad; hi += pad;
    }
    const t0 = vals[0].t, span = Math.max(1, vals[vals.length - 1].t - t0);
    line.setAttribute('points', vals.map((p) => {
      const y = 21 - ((Math.min(hi, Math.max(lo, p.v[key])) - lo) / (hi - lo)) * 20;
      return ((100 * (p.t - t0)) / span).toFixed(2) + ',' + y.toFixed(2);
    }).join(' '));
  }

  // ---------- fleet ----------
  const GAUGES = [
    ['cpu', 'CPU', true, (v) => fmt.pct(v.cpu)],
    ['mem', 'Mem', true, (v) => fmt.pct(v.mem) + (ok(v.memTotal) ? ' of ' + fmt.bytes(v.memTotal) : '')],
    ['disk', 'Disk', true, (v) => fmt.pct(v.disk) + (ok(v.diskTotal) ? ' of ' + fmt.bytes(v.diskTotal) : '')],
    ['temp', 'Temp', false, (v) => fmt.temp(v.temp)],
  ];

  function fleetView(view) {
    const f = st.filter;
    const field = (id, label, input) => h('div', { class: id === 'f-q' ? 'field wide' : 'field' }, h('label', { for: id, text: label }), input);
    const q = h('input', { id: 'f-q', type: 'search', placeholder: 'hostname or id', autocomplete: 'off' });
    q.value = f.q;
    const status = h('select', { id: 'f-status' },
      ['', 'online', 'stale', 'offline'].map((s) => h('option', { value: s, text: s || 'All' })));
    status.value = f.status;
    const label = h('select', { id: 'f-label' }, h('option', { value: '', text: 'All labels' }));
    st.labelOpts = '';
    const refilter = () => {
      f.q = q.value.trim().toLowerCase();
      f.status = status.value;
      f.label = label.value;
      if (st.fleetData) renderFleet(st.fleetData);
    };
    q.addEventListener('input', refilter);
    status.addEventListener('change', refilter);
    label.addEventListener('change', refilter);
    add(view, [
      h('div', { class: 'summary' },
        h('h1', { text: 'Fleet' }),
        h('span', {}, h('span', { class: 'count', id: 'count-online', text: '0' }), ' online'),
        h('span', {}, h('span', { class: 'count', id: 'count-stale', text: '0' }), ' stale'),
        h('span', {}, h('span', { class: 'count', id: 'count-offline', text: '0' }), ' offline'),
        h('span', { class: 'muted' }, h('span', { id: 'count-total', text: '0' }), ' workers')),
      h('div', { class: 'toolbar', role: 'search' },
        field('f-q', 'Search', q), field('f-status', 'Status', status), field('f-label', 'Label', label)),
      h('p', { id: 'fleet-empty', class: 'empty', hidden: true }),
      h('ul', { id: 'cards', class: 'cards', 'aria-label': 'Workers' }),
    ]);
    document.title = 'Fleet · aerekos';
    focusHeading(view);
    st.fleetData = null;
    startPolling(pollFleet);
  }

  async function pollFleet() {
    const data = await api('GET', '/workers');
    const workers = (data.workers || []).sort((a, b) =>
      a.hostname.localeCompare(b.hostname, undefined, { numeric: true }) || a.id.localeCompare(b.id));
    await Promise.all(workers.map(loadSpark));
    for (const w of workers) {
      const sp = st.spark.get(w.id);
      if (w.summary && sp) {
        const last = sp.pts.length ? sp.pts[sp.pts.length - 1].t : -1;
        if (w.summary.received_at_ms > last) {
          sp.pts.push({ t: w.summary.received_at_ms, v: fromSummary(w.summary) });
          if (sp.pts.length > SPARK_POINTS) sp.pts.splice(0, sp.pts.length - SPARK_POINTS);
        }
      }
    }
    st.fleetData = workers;
    if ($('#cards')) renderFleet(workers);
  }

  async function loadSpark(w) {
    if (st.spark.has(w.id)) return;
    const anchor = (w.summary && w.summary.received_at_ms) || w.last_seen_ms;
    const sp = { pts: [] };
    if (anchor) {
      try {
        const r = await api('GET', `/workers/${enc(w.id)}/metrics?resolution=raw&from=${Math.max(0, anchor - SPARK_SPAN_MS)}&to=${anchor}&max_points=${SPARK_POINTS}`);
        sp.pts = (r.points || []).map(rawPoint);
      } catch (e) {
        if (e instanceof AuthError) throw e; // else: no history, the sparkline fills from polling
      }
    }
    st.spark.set(w.id, sp);
  }

  function renderFleet(workers) {
    const f = st.filter;
    const count = (s) => workers.filter((w) => !w.revoked && w.status === s).length;
    setText($('#count-online'), String(count('online')));
    setText($('#count-stale'), String(count('stale')));
    setText($('#count-offline'), String(count('offline')));
    setText($('#count-total'), String(workers.length));

    const labels = [...new Set(workers.flatMap((w) => Object.entries(w.labels || {}).map(([k, v]) => k + '=' + v)))].sort();
    const key = labels.join('\n');
    const sel = $('#f-label');
    if (sel && key !== st.labelOpts) {
      st.labelOpts = key;
      sel.replaceChildren(h('option', { value: '', text: 'All labels' }), ...labels.map((l) => h('option', { value: l, text: l })));
      sel.value = labels.includes(f.label) ? f.label : '';
      f.label = sel.value;
    }

    const list = $('#cards');
    const seen = new Set();
    let shown = 0;
    for (const w of workers) {
      seen.add(w.id);
      let card = st.cards.get(w.id);
      if (!card) {
        card = workerCard(w);
        st.cards.set(w.id, card);
      }
      list.append(card); // keeps the sorted order (moves, never re-creates)
      updateCard(card, w);
      const lab = Object.entries(w.labels || {}).map(([k, v]) => k + '=' + v);
      const match = (!f.q || w.hostname.toLowerCase().includes(f.q) || w.id.toLowerCase().includes(f.q)) &&
        (!f.status || (!w.revoked && w.status === f.status)) && (!f.label || lab.includes(f.label));
      card.hidden = !match;
      if (match) shown++;
    }
    for (const [id, card] of st.cards) {
      if (!seen.has(id)) { card.remove(); st.cards.delete(id); st.spark.delete(id); }
    }
    const empty = $('#fleet-empty');
    empty.replaceChildren();
    if (!workers.length) {
      add(empty, ['No workers yet. Enrol a Pi with the registration token from ', h('a', { href: '#/settings', text: 'Settings' }), '.']);
    } else if (!shown) {
      empty.textContent = 'No worker matches the filter.';
    }
    empty.hidden = shown > 0;
  }

  function workerCard(w) {
    const gauges = h('div', { class: 'gauges' });
    for (const [k, name] of GAUGES) {
      add(gauges, [h('span', { class: 'k', text: name }), spark(k), h('span', { class: 'v', 'data-v': k })]);
    }
    return h('li', { class: 'card', 'data-id': w.id },
      h('div', { class: 'card-head' },
        h('a', { href: '#/workers/' + enc(w.id), class: 'name' }), h('span', { class: 'badge' })),
      h('div', { class: 'meta' }),
      h('ul', { class: 'chips', 'aria-label': 'Labels' }),
      gauges);
  }

  function updateCard(card, w) {
    card.dataset.status = w.revoked ? 'revoked' : w.status;
    setText($('.name', card), w.hostname);
    setBadge($('.badge', card), w);
    const meta = [w.device_model || 'unknown model', w.arch || '?', 'seen ' + fmt.ago(w.last_seen_ms)].join(' · ');
    setText($('.meta', card), meta);
    const labels = Object.entries(w.labels || {}).map(([k, v]) => k + '=' + v);
    const chips = $('.chips', card);
    if (chips.dataset.key !== labels.join('\n')) {
      chips.dataset.key = labels.join('\n');
      chips.replaceChildren(...labels.map((l) => h('li', { class: 'chip', text: l })));
    }
    const sp = st.spark.get(w.id) || { pts: [] };
    const latest = w.summary ? fromSummary(w.summary) : {};
    for (const [k, , fixed, show] of GAUGES) {
      drawSpark($(`[data-spark=${k}]`, card), sp.pts, k, fixed);
      setText($(`[data-v=${k}]`, card), w.summary ? show(latest) : dash);
    }
  }

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
  function workerView(view, id) {
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
            h('span', { id: 'rotate-result', class: 'muted', role: 'status' }))),
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
      detail = await api('GET', `/workers/${enc(w.id)}`);
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
      ['Agent', inv.agent_version], ['Interval', d.interval_ms ? d.interval_ms / 1000 + ' s' : dash],
      ['Enrolled', fmt.time(d.enrolled_at_ms)], ['Last seen', fmt.time(d.last_seen_ms)],
      ['Last IP', d.last_ip || dash],
      ['Frames', d.counters ? `${d.counters.accepted} accepted, ${d.counters.rejected} rejected` : dash],
    ];
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

  // ---------- services ----------
  const NAME_RE = /^[a-z0-9-]{1,32}$/;
  const U32 = 4294967295;
  const OPS = { start: 'Start', stop: 'Stop', restart: 'Restart' };
  const quote = (a) => (a === '' || /[\s"'\\]/.test(a) ? JSON.stringify(a) : a);
  const cmdLine = (spec) => [spec.command, ...(spec.args || []).map(quote)].join(' ');
  const latestSpec = (d) => { const v = d.versions || []; return v.length ? v[v.length - 1] : null; };
  const kindOf = (sp) => (sp && sp.kind) || 'process';
  const short = (sha) => String(sha).slice(0, 12);
  const words = (t) => t.split(/\s+/).filter(Boolean);
  const pairs = (o, sep) => Object.entries(o || {}).map(([k, v]) => k + '=' + (typeof v === 'string' ? v : JSON.stringify(v))).join(sep || ' ');
  const portText = (p) => `${p.host}:${p.container}/${p.udp ? 'udp' : 'tcp'}`;
  const volText = (v) => `${v.source}:${v.target}` + (v.read_only ? ':ro' : '');
  // What runs: the command line, the image, or the artifact per architecture.
  const program = (sp) => !sp ? dash : sp.image ? [sp.image, ...(sp.args || []).map(quote)].join(' ')
    : sp.command ? cmdLine(sp) : pairs(Object.fromEntries(Object.entries(sp.artifacts || {}).map(([a, x]) => [a, short(x)])));
  function healthText(c) {
    if (!c) return 'none';
    const p = c.http ? `HTTP GET :${c.http.port}${c.http.path}` : 'command ' + [c.command.command, ...(c.command.args || []).map(quote)].join(' ');
    return `${p}, every ${c.interval_ms} ms, timeout ${c.timeout_ms} ms, unhealthy after ${c.retries} failures` +
      (c.start_period_ms ? `, ${c.start_period_ms} ms grace` : '');
  }
  const limitsText = (l) => [l.memory_bytes && fmt.bytes(l.memory_bytes) + ' memory', l.cpu_millicores && l.cpu_millicores / 1000 + ' CPU',
    l.pids && l.pids + ' processes'].filter(Boolean).join(', ') || 'none';

  function stateBadge(el, a) {
    const s = a ? a.state : 'unknown';
    el.className = 'badge ' + s;
    setText(el, a ? s : 'not reported');
  }
  // Desired vs actual for one service detail: { text, cls, label }.
  function svcSummary(d) {
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
  function placement(dep, hosts) {
    if (!dep) return 'not deployed';
    const parts = [];
    if ((dep.workers || []).length) parts.push('workers ' + dep.workers.map((id) => hosts.get(id) || id).join(', '));
    const labels = Object.entries(dep.labels || {}).map(([k, v]) => k + '=' + v);
    if (labels.length) parts.push('labels ' + labels.join(', '));
    return (parts.join(' + ') || 'nobody') + ` · v${dep.version}, ${dep.desired_state}`;
  }
  // Puts `el` at position `i` of `parent`, moving it only when it is elsewhere
  // (moving a node takes the keyboard focus away from inside it).
  function place(parent, el, i) {
    const at = parent.children[i];
    if (at !== el) parent.insertBefore(el, at || null);
  }
  const kv = (rows) => rows.filter(Boolean).flatMap(([k, v, cls]) =>
    [h('dt', { text: k }), h('dd', { class: cls || null, text: v === undefined || v === null || v === '' ? dash : String(v) })]);

  function servicesView(view) {
    const s = { cards: new Map(), arts: [], artKey: null, artSel: {} };
    st.svcList = s;
    add(view, [
      h('div', { class: 'summary' }, h('h1', { text: 'Services' }), h('span', { class: 'muted', id: 'svc-count' })),
      h('div', { class: 'row' },
        h('button', { type: 'button', id: 'new-service', class: 'primary', 'aria-expanded': 'false', 'aria-controls': 'svc-form',
          text: 'New service', onclick: () => openServiceForm(true) })),
      serviceForm(),
      h('p', { id: 'svc-empty', class: 'empty', hidden: true }),
      h('ul', { id: 'services-list', class: 'cards svc-cards', 'aria-label': 'Services' }),
      h('section', { class: 'panel arts', 'aria-labelledby': 'art-h' },
        h('h2', { id: 'art-h', text: 'Artifacts' }),
        h('p', { class: 'muted small', text: 'Programs for process services, one file per architecture; workers download the one for their architecture and check its SHA-256.' }),
        h('table', { class: 'svc-table', id: 'art-table', hidden: true },
          h('thead', {}, h('tr', {}, ['Name', 'Arch', 'SHA-256', 'Size', 'Uploaded', 'Action'].map((t) => h('th', { text: t })))),
          h('tbody', { id: 'art-rows' })),
        h('p', { class: 'muted small', id: 'art-empty' }),
        h('form', { class: 'row', id: 'art-form', novalidate: true, onsubmit: uploadArtifact },
          h('div', { class: 'field' }, h('label', { for: 'art-file', text: 'File' }), h('input', { id: 'art-file', type: 'file' })),
          h('div', { class: 'field' }, h('label', { for: 'art-arch', text: 'Architecture' }),
            h('input', { id: 'art-arch', list: 'arch-list', autocomplete: 'off', spellcheck: 'false', placeholder: 'aarch64' }),
            h('datalist', { id: 'arch-list' })),
          h('div', { class: 'field' }, h('label', { for: 'art-name', text: 'Name' }),
            h('input', { id: 'art-name', maxlength: 128, autocomplete: 'off', placeholder: 'the file name' })),
          h('button', { type: 'submit', id: 'art-upload', text: 'Upload' })),
        h('p', { class: 'error', id: 'art-error', role: 'alert' })),
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

  function renderArtifacts(s, fleet) {
    const key = JSON.stringify(s.arts);
    if (s.artKey === key) return;
    s.artKey = key;
    $('#art-rows').replaceChildren(...s.arts.map((a) => {
      const td = (label, t, cls) => h('td', { 'data-label': label, class: cls, text: t });
      return h('tr', { 'data-sha': a.sha256 }, td('Name', a.name || dash), td('Arch', a.arch), td('SHA-256', a.sha256, 'mono sha'),
        td('Size', fmt.bytes(a.size)), td('Uploaded', fmt.time(a.created_ms)),
        h('td', { 'data-label': 'Action' }, h('button', { type: 'button', class: 'danger', text: 'Delete',
          'aria-label': `Delete artifact ${a.name || short(a.sha256)} (${a.arch})`, onclick: () => deleteArtifact(a) })));
    }));
    $('#art-table').hidden = !s.arts.length;
    setText($('#art-empty'), s.arts.length ? '' : 'No artifacts uploaded.');
    const arches = [...new Set(fleet.map((w) => w.arch).concat(s.arts.map((a) => a.arch)).filter(Boolean))];
    $('#arch-list').replaceChildren(...arches.map((a) => h('option', { value: a })));
    renderArtSelects(s);
  }
  async function uploadArtifact(ev) {
    ev.preventDefault();
    const file = $('#art-file').files[0], arch = $('#art-arch').value.trim(), err = $('#art-error'), btn = $('#art-upload');
    setText(err, '');
    if (!file) { setText(err, 'Choose a file.'); return $('#art-file').focus(); }
    if (!/^[A-Za-z0-9_-]{1,32}$/.test(arch)) { setText(err, 'Architecture: 1 to 32 of A-Z, a-z, 0-9, _ and -, e.g. aarch64.'); return $('#art-arch').focus(); }
    btn.disabled = true;
    setText(btn, 'Uploading…');
    try {
      const a = await api('POST', `/artifacts?arch=${enc(arch)}&name=${enc($('#art-name').value.trim() || file.name)}`, file);
      toast(`Uploaded ${a.name} for ${a.arch}: ${short(a.sha256)}, ${fmt.bytes(a.size)}`);
      ev.target.reset();
      startPolling(pollServices);
    } catch (e) {
      if (!(e instanceof AuthError)) setText(err, 'Not uploaded: ' + e.message);
    } finally {
      btn.disabled = false;
      setText(btn, 'Upload');
    }
  }
  async function deleteArtifact(a) {
    setText($('#art-error'), '');
    try {
      await api('DELETE', '/artifacts/' + a.sha256);
      toast(`Artifact ${a.name || short(a.sha256)} deleted`);
      $('#art-file').focus();
      startPolling(pollServices);
    } catch (e) {
      if (!(e instanceof AuthError)) setText($('#art-error'), 'Not deleted: ' + e.message);
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
    renderArtifacts(s, fleet.workers || []);
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

  // ---------- one service ----------
  function serviceView(view, name) {
    const s = { name, rows: new Map(), dirty: false, fleetKey: null, data: null, busy: new Set() };
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
        h('section', { class: 'panel', 'aria-labelledby': 'ro-h' },
          h('h2', { id: 'ro-h', text: 'Rollout' }),
          h('dl', { class: 'kv', id: 's-ro' }),
          h('form', { id: 'ro-form', novalidate: true, onsubmit: startRollout, oninput: () => { s.roDirty = true; } },
            h('h3', { text: 'Roll out version…' }),
            h('div', { class: 'row' },
              h('div', { class: 'field' }, h('label', { for: 'ro-version', text: 'Version' }), sel('ro-version', [])),
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
          h('p', { class: 'muted small', id: 'ro-none', text: 'No rollouts yet.' })),
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

    // Recent events about the service, newest first.
    const ev = d.events || [], ekey = JSON.stringify(ev);
    if (s.evKey !== ekey) {
      s.evKey = ekey;
      $('#s-events').replaceChildren(...(ev.length ? ev.map((e) => h('li', {},
        h('span', { class: 'muted', text: `${fmt.time(e.received_at_ms)} ${hosts.get(e.worker_id) || e.worker_id} ` }), e.kind + ': ' + e.detail)) :
        [h('li', { class: 'muted', text: 'No events about this service since the conductor started.' })]));
    }
  }
  function setKv(el, rows) {
    const key = JSON.stringify(rows);
    if (el.dataset.key !== key) { el.dataset.key = key; el.replaceChildren(...kv(rows)); }
  }
  function renderHistory(list) {
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
      startPolling(pollService);
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
      startPolling(pollService);
    } catch (e) {
      if (!(e instanceof AuthError)) setText($('#ro-error'), 'Not aborted: ' + e.message);
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

  // ---------- log panel (one per page: a service's log on one worker, followed) ----------
  const LOG_KEEP = 200 * 1024; // characters kept in the panel
  function logPanel() {
    return h('section', { class: 'panel logs', id: 'log-panel', 'aria-labelledby': 'log-h', hidden: true },
      h('div', { class: 'row log-head' }, h('h2', { id: 'log-h', text: 'Log' }),
        h('span', { class: 'muted small', id: 'log-state', role: 'status' }),
        h('button', { type: 'button', id: 'log-toggle', onclick: toggleLog }),
        h('button', { type: 'button', id: 'log-close', text: 'Close', onclick: () => closeLog() })),
      h('p', { class: 'error', id: 'log-error', role: 'alert' }),
      h('pre', { class: 'log', id: 'log-text', tabindex: '0', 'aria-label': 'Log output' }));
  }
  function openLog(id, host, name, opener) {
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
  function closeLog(quiet) {
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

  // ---------- settings ----------
  function secretBox(id, value, label) {
    const el = id === 'enrol-cmd' ? h('pre', { id, tabindex: '0', 'aria-label': label, text: value })
      : h('input', { id, readonly: true, class: 'mono', value, 'aria-label': label });
    return h('div', { class: 'secret' }, el,
      h('button', { type: 'button', 'data-copy': id, text: 'Copy', 'aria-label': 'Copy ' + label, onclick: () => copy(value) }));
  }

  function settingsView(view) {
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
          h('p', { class: 'muted', text: 'For scripts: send Authorization: Bearer <token>.' }),
          h('table', { id: 'tokens' }, h('thead', {}, h('tr', {}, h('th', { text: 'Name' }), h('th', { text: 'Created' }), h('th', {}, h('span', { class: 'muted', text: 'Action' })))),
            h('tbody', { id: 'tokens-body' })),
          h('form', { class: 'row', id: 'token-form', onsubmit: createToken },
            h('div', { class: 'field' }, h('label', { for: 'token-name', text: 'New token name' }),
              h('input', { id: 'token-name', maxlength: 64, autocomplete: 'off', required: true })),
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
    await loadTokens();
  }
  async function loadTokens() {
    const r = await api('GET', '/tokens');
    const tokens = r.tokens || [];
    $('#tokens-body').replaceChildren(...(tokens.length ? tokens.map((t) => h('tr', { 'data-token': t.id },
      h('td', { text: t.name }), h('td', { text: fmt.time(t.created_ms) }),
      h('td', {}, h('button', { type: 'button', class: 'danger', text: 'Delete', 'aria-label': 'Delete token ' + t.name,
        onclick: () => deleteToken(t) })))) :
      [h('tr', {}, h('td', { colspan: '3', class: 'muted', text: 'No API tokens.' }))]));
  }
  async function createToken(ev) {
    ev.preventDefault();
    const name = $('#token-name').value.trim();
    setText($('#token-error'), '');
    if (!name) { setText($('#token-error'), 'Enter a name.'); $('#token-name').focus(); return; }
    try {
      const t = await api('POST', '/tokens', { name });
      $('#token-name').value = '';
      const box = $('#token-result');
      box.replaceChildren(h('p', { class: 'notice', text: `Token "${t.name}" (shown once — copy it now):` }),
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

  // ---------- boot ----------
  async function boot() {
    $('#login-form').addEventListener('submit', onLogin);
    $('#logout').addEventListener('click', onLogout);
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
})();
