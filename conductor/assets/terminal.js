// A small xterm-like terminal emulator (enough for a shell, vi, less, top)
// and the remote shell session on it (POST /workers/{id}/shell). No external
// code. The screen: a grid of cells, a <div> per row, a <span> per attribute
// run, colours as classes (app.css; 256-colour and truecolour map to the
// nearest of the 16). Not emulated: mouse reporting, tab stops other than
// every 8, G2/G3 charsets, double-width lines, IME composition.
import { api, enc, signedOut } from './core.js';

const SB = 1000; // scrollback rows kept
const DEF = 16 | (16 << 5), BG = 31 << 5; // attr: fg bits 0-4, bg 5-9 (16: default), flags 10-16
const FL = [0, 1, 2, 3, 4, 0, 0, 5, 6, 7].map((b) => (b ? 1 << (9 + b) : 0)); // SGR 1-9
const FLC = ['tb', 'td', 'ti', 'tu', 'rv', 'th', 'ts'];
const PAL = '000000cd000000cd00cdcd000000eecd00cd00cdcde5e5e57f7f7fff000000ff00ffff005c5cffff00ff00ffffffffff';
const RGB = [...Array(16)].map((_, i) => [0, 2, 4].map((j) => parseInt(PAL.substr(i * 6 + j, 2), 16)));
const DEC = '◆▒␉␌␍␊°±␤␋┘┐┌└┼⎺⎻─⎼⎽├┤┴┬│≤≥π≠£·'; // DEC line drawing, ` to ~
const WIDE = [0x1100, 0x115f, 0x2e80, 0xa4cf, 0xac00, 0xd7a3, 0xf900, 0xfaff, 0xfe30, 0xfe4f, 0xff00, 0xff60,
  0xffe0, 0xffe6, 0x1f300, 0x1f64f, 0x1f900, 0x1f9ff, 0x20000, 0x3fffd];
const ZERO = [0x300, 0x36f, 0x200b, 0x200f, 0x20d0, 0x20ff, 0xfe00, 0xfe0f];
const within = (t, c) => { for (let i = 0; i < t.length; i += 2) if (c >= t[i] && c <= t[i + 1]) return true; return false; };
function nearest(...v) {
  let best = 0, bd = Infinity;
  RGB.forEach((p, i) => { const d = p.reduce((s, x, j) => s + (x - v[j]) ** 2, 0); if (d < bd) { bd = d; best = i; } });
  return best;
}
function c256(n) {
  const v = (k) => (k ? 55 + 40 * k : 0), g = 8 + 10 * (n - 232);
  return n < 16 ? n : n > 231 ? nearest(g, g, g) : ((n -= 16), nearest(v(Math.floor(n / 36)), v(Math.floor(n / 6) % 6), v(n % 6)));
}
const CLS = new Map();
function cls(a) {
  if (CLS.has(a)) return CLS.get(a);
  let f = a & 31, b = (a >> 5) & 31;
  if (a & FL[7]) [f, b] = [b > 15 ? 'i' : b, f > 15 ? 'i' : f];
  const k = [f < 16 || f === 'i' ? 'f' + f : '', b < 16 || b === 'i' ? 'b' + b : '']
    .concat(FLC.filter((_, i) => i !== 4 && a & (1 << (10 + i)))).filter(Boolean).join(' ');
  CLS.set(a, k);
  return k;
}
const div = (c) => { const d = document.createElement('div'); d.className = c || ''; return d; };
const KEYS = { ArrowUp: 'A', ArrowDown: 'B', ArrowRight: 'C', ArrowLeft: 'D', Home: 'H', End: 'F', F1: 'P', F2: 'Q', F3: 'R', F4: 'S' };
const TILDE = { Insert: 2, Delete: 3, PageUp: 5, PageDown: 6, F5: 15, F6: 17, F7: 18, F8: 19, F9: 20, F10: 21, F11: 23, F12: 24 };
const MAC = /Mac|iP/.test(navigator.platform);

// The emulator in `el` (focusable: takes the keys and pastes). opts:
// onData(string) what to send, onResize(cols, rows), size: [cols, rows]
// (fixed; otherwise fitted to the element, and refitted as it resizes).
export class Term {
  constructor(el, opts) {
    Object.assign(this, { el, o: opts || {}, sbEl: div(), scr: div(), probe: div('tp'), dec: new TextDecoder() });
    this.probe.textContent = 'W'.repeat(10);
    el.classList.add('term');
    el.tabIndex = 0;
    el.replaceChildren(this.sbEl, this.scr, this.probe);
    [this.cols, this.rows] = this.o.size || [80, 24];
    this.reset();
    el.addEventListener('keydown', (e) => this.key(e));
    el.addEventListener('paste', (e) => this.paste(e));
    if (this.o.size) return;
    this.fit();
    (this.ro = new ResizeObserver(() => this.fit())).observe(el);
  }
  reset() {
    Object.assign(this, { main: this.grid(), alt: this.grid(), x: 0, y: 0, top: 0, bot: this.rows - 1, attr: DEF,
      wrapnext: false, cs: [0, 0, 0], gl: 0, g: 0, saved: null, sb: [], state: 0, seq: '', last: ' ' });
    this.lines = this.main;
    this.m = { app: false, wrap: true, cur: true, origin: false, ins: false, paste: false };
    this.schedule();
  }
  blank(a) { return { c: Array(this.cols).fill(' '), a: Array(this.cols).fill(a || DEF), d: 1 }; }
  grid() { return Array.from({ length: this.rows }, () => this.blank()); }
  ea() { return (DEF & ~BG) | (this.attr & BG); } // erasing keeps the background colour
  // The screen's text, a line per row (tests, debugging).
  text() { return this.lines.map((l) => l.c.join('').trimEnd()).join('\n'); }

  write(data) {
    for (const ch of typeof data === 'string' ? data : this.dec.decode(data, { stream: true })) this.put(ch);
    this.schedule();
  }
  put(ch) {
    const c = ch.codePointAt(0), s = this.state;
    if (!s) { // ground
      if (c < 32) this.ctl(c);
      else if (c !== 127 && (c < 0x80 || c >= 0xa0)) this.print(ch, c);
    } else if (s === 1) this.esc(ch, c);
    else if (s === 2) { // CSI: parameters, intermediates, the final byte
      if (c >= 0x40 && c <= 0x7e) { this.state = 0; this.csi(ch); }
      else if (c === 0x18 || c === 0x1a) this.state = 0;
      else if (c < 32) this.ctl(c);
      else if (this.seq.length < 256) this.seq += ch;
    } else if (s === 3) { // OSC, DCS, APC, PM, SOS: skipped to BEL or ST
      if (c === 0x1b) this.state = 4;
      else if (c === 7 || c === 0x18 || c === 0x1a || c === 0x9c) this.state = 0;
    } else if (s === 4) { // ESC in a string: ESC \ ends it, anything else starts over
      this.state = 0;
      if (ch !== '\\') this.esc(ch, c);
    } else {
      if (s === 5) this.cs[this.g] = ch === '0' ? 1 : 0; // ESC ( X: charset of G0, G1
      this.state = 0; // ESC # X, ESC SP X, ESC % X: ignored
    }
  }
  ctl(c) {
    if (c === 8) { this.wrapnext = false; if (this.x > 0) this.x--; }
    else if (c === 9) this.x = Math.min(this.cols - 1, (Math.floor(this.x / 8) + 1) * 8);
    else if (c >= 10 && c <= 12) this.index();
    else if (c === 13) { this.x = 0; this.wrapnext = false; }
    else if (c === 14 || c === 15) this.gl = 15 - c;
    else if (c === 0x1b) this.state = 1;
  }
  esc(ch, c) {
    this.state = 0;
    const g = '()*+-./'.indexOf(ch);
    if (ch === '[') { this.state = 2; this.seq = ''; }
    else if (']P_^X'.includes(ch)) this.state = 3;
    else if (g >= 0) { this.g = Math.min(g, 2); this.state = 5; }
    else if ('# %'.includes(ch)) this.state = 6;
    else if (ch === '7') this.save();
    else if (ch === '8') this.restore();
    else if (ch === 'D' || ch === 'E') { if (ch === 'E') this.x = 0; this.index(); }
    else if (ch === 'M') this.rindex();
    else if (ch === 'c') { this.reset(); this.sbEl.replaceChildren(); }
    else if (c < 32) this.ctl(c);
  }
  print(ch, c) {
    if (this.cs[this.gl] && c >= 0x60 && c <= 0x7e) ch = DEC[c - 0x60];
    let l = this.lines[this.y], x = this.wrapnext ? this.x : this.x - 1;
    if (within(ZERO, c)) { // a combining mark joins the previous cell
      if (x > 0 && l.c[x] === '') x--;
      if (x >= 0) { l.c[x] += ch; l.d = 1; }
      return;
    }
    const w = within(WIDE, c) ? 2 : 1, n = this.cols;
    if (this.wrapnext || this.x + w > n) {
      if (this.m.wrap) { this.x = 0; this.index(); l = this.lines[this.y]; }
      else this.x = n - w;
    }
    x = this.x;
    if (this.m.ins) this.insert(l, x, w);
    if (l.c[x] === '' && x > 0) l.c[x - 1] = ' '; // half of a wide character
    l.c[x] = ch;
    l.a[x] = this.attr;
    if (w === 2) { l.c[x + 1] = ''; l.a[x + 1] = this.attr; }
    if (l.c[x + w] === '') l.c[x + w] = ' ';
    l.d = 1;
    this.last = ch;
    this.x += w;
    this.wrapnext = this.x >= n && this.m.wrap;
    if (this.x >= n) this.x = n - 1;
  }
  insert(l, x, k) {
    l.c.splice(x, 0, ...Array(k).fill(' '));
    l.a.splice(x, 0, ...Array(k).fill(this.ea()));
    l.c.length = l.a.length = this.cols;
    l.d = 1;
  }
  erase(l, from, to) {
    for (let i = Math.max(0, from); i < Math.min(to, this.cols); i++) { l.c[i] = ' '; l.a[i] = this.ea(); }
    l.d = 1;
  }
  index() {
    this.wrapnext = false;
    if (this.y === this.bot) this.scroll(1, this.top, true);
    else if (this.y < this.rows - 1) this.y++;
  }
  rindex() {
    this.wrapnext = false;
    if (this.y === this.top) this.scroll(-1, this.top);
    else if (this.y > 0) this.y--;
  }
  // Scrolls rows top..bot up by n (down if negative); rows leaving the main
  // screen's top go to the scrollback when `keep`.
  scroll(n, top, keep) {
    const L = this.lines, bot = this.bot;
    for (let i = Math.min(Math.abs(n), bot - top + 1); i > 0; i--) {
      const gone = L.splice(n > 0 ? top : bot, 1)[0];
      L.splice(n > 0 ? bot : top, 0, this.blank(this.ea()));
      if (n > 0 && keep && !top && L === this.main) this.sb.push(gone);
    }
    if (this.sb.length > 2 * SB) this.sb.splice(0, this.sb.length - SB);
  }
  go(x, y) {
    this.x = Math.max(0, Math.min(this.cols - 1, x));
    this.y = Math.max(0, Math.min(this.rows - 1, y));
    this.wrapnext = false;
  }
  save() { this.saved = { x: this.x, y: this.y, attr: this.attr, origin: this.m.origin, cs: this.cs.slice(), gl: this.gl }; }
  restore() {
    const s = this.saved || { x: 0, y: 0, attr: DEF, origin: false, cs: [0, 0, 0], gl: 0 };
    this.go(s.x, s.y);
    Object.assign(this, { attr: s.attr, cs: s.cs.slice(), gl: s.gl });
    this.m.origin = s.origin;
  }
  csi(f) {
    let s = this.seq, pre = '';
    if (/^[<=>?]/.test(s)) { pre = s[0]; s = s.slice(1); }
    if (/[ -/]/.test(s)) return; // intermediates (cursor style, soft reset…): ignored
    const p = s.split(';'), n = (i, d = 1) => parseInt(p[i], 10) || d, n0 = n(0);
    const { x, y, rows, cols, top, bot } = this, l = this.lines[y], org = this.m.origin ? top : 0;
    const up = y >= top ? top : 0, down = y <= bot ? bot : rows - 1, last = this.m.origin ? bot : rows - 1;
    switch (pre + f) {
      case '@': return this.insert(l, x, Math.min(n0, cols - x));
      case 'A': return this.go(x, Math.max(up, y - n0));
      case 'B': case 'e': return this.go(x, Math.min(down, y + n0));
      case 'C': case 'a': return this.go(x + n0, y);
      case 'D': return this.go(x - n0, y);
      case 'E': return this.go(0, Math.min(down, y + n0));
      case 'F': return this.go(0, Math.max(up, y - n0));
      case 'G': case '`': return this.go(n0 - 1, y);
      case 'H': case 'f': return this.go(n(1) - 1, Math.min(n0 - 1 + org, last));
      case 'd': return this.go(x, Math.min(n0 - 1 + org, last));
      case 'I': return this.go((Math.floor(x / 8) + n0) * 8, y);
      case 'Z': return this.go((Math.ceil(x / 8) - n0) * 8, y);
      case 'J': case '?J': {
        const m = n(0, 0);
        if (m === 3) { this.sbEl.replaceChildren(); this.sb = []; return; }
        this.lines.forEach((r, i) => { if (m === 2 || (m ? i < y : i > y)) this.erase(r, 0, cols); });
        return m < 2 && this.erase(l, m ? 0 : x, m ? x + 1 : cols);
      }
      case 'K': case '?K': { const m = n(0, 0); return this.erase(l, m ? 0 : x, m === 1 ? x + 1 : cols); }
      case 'L': case 'M':
        if (y >= top && y <= bot) { this.scroll(f === 'L' ? -n0 : n0, y); this.go(0, y); }
        return;
      case 'P': {
        const k = Math.min(n0, cols - x);
        l.c.splice(x, k);
        l.a.splice(x, k);
        return this.erase(l, cols - k, cols); // refills the row to `cols`
      }
      case 'X': return this.erase(l, x, x + n0);
      case 'S': return this.scroll(n0, top);
      case 'T': return p.length < 2 && this.scroll(-n0, top);
      case 'b': for (let i = Math.min(n0, 65535); i > 0; i--) this.print(this.last, this.last.codePointAt(0)); return;
      case 'm': return this.sgr(p);
      case 'r': {
        const t = n0 - 1, b = Math.min(n(1, rows), rows) - 1;
        if (t < b) { this.top = t; this.bot = b; this.go(0, this.m.origin ? t : 0); }
        return;
      }
      case 's': return this.save();
      case 'u': return this.restore();
      case 'n': return this.reply(n0 === 5 ? '\x1b[0n' : n0 === 6 ? `\x1b[${y + 1 - org};${x + 1}R` : '');
      case 'c': return this.reply(n(0, 0) ? '' : '\x1b[?1;2c');
      case '>c': return this.reply(n(0, 0) ? '' : '\x1b[>0;276;0c');
      case 'h': case 'l': if (p.includes('4')) this.m.ins = f === 'h'; return;
      case '?h': case '?l': for (const v of p) this.mode(+v, f === 'h');
    }
  }
  reply(s) { if (s && this.o.onData) this.o.onData(s); }
  mode(v, on) {
    const m = this.m;
    if (v === 1) m.app = on;
    else if (v === 6) { m.origin = on; this.go(0, on ? this.top : 0); }
    else if (v === 7) m.wrap = on;
    else if (v === 25) m.cur = on;
    else if (v === 2004) m.paste = on;
    else if ((v === 47 || v === 1047 || v === 1049) && on !== (this.lines === this.alt)) {
      if (on && v === 1049) this.save();
      if (on) this.alt = this.grid();
      this.lines = on ? this.alt : this.main;
      if (!on && v === 1049) this.restore();
    }
  }
  sgr(p) {
    let a = this.attr;
    const fg = (c) => (a & ~31) | c, bg = (c) => (a & ~BG) | (c << 5), rgb = (q) => nearest(...q.map((k) => +k || 0));
    for (let i = 0; i < p.length; i++) {
      const sub = p[i].split(':'), v = parseInt(sub[0], 10) || 0;
      if (v === 38 || v === 48 || v === 58) { // 5;n or 2;r;g;b, also with colons
        let c = -1;
        if (sub.length > 1) c = sub[1] === '5' ? c256(+sub[2] || 0) : sub[1] === '2' ? rgb(sub.slice(-3)) : -1;
        else if (p[i + 1] === '5') { c = c256(+p[i + 2] || 0); i += 2; }
        else if (p[i + 1] === '2') { c = rgb(p.slice(i + 2, i + 5)); i += 4; }
        if (c >= 0 && v < 58) a = v === 38 ? fg(c) : bg(c);
      } else if (!v) a = DEF;
      else if (v < 10) a |= FL[v];
      else if (v === 21) a |= FL[4]; // double underline
      else if (v > 21 && v < 30) a &= ~(FL[v - 20] | (v === 22 ? FL[1] : 0));
      else if (v >= 30 && v <= 37) a = fg(v - 30);
      else if (v >= 90 && v <= 97) a = fg(v - 82);
      else if (v === 39) a = fg(16);
      else if (v >= 40 && v <= 47) a = bg(v - 40);
      else if (v >= 100 && v <= 107) a = bg(v - 92);
      else if (v === 49) a = bg(16);
    }
    this.attr = a;
  }

  // ---------- size ----------
  fit() {
    const r = this.probe.getBoundingClientRect(), cs = getComputedStyle(this.el), px = (k) => parseFloat(cs[k]) || 0;
    if (!r.width || !r.height) return; // not shown
    this.resize(Math.floor((this.el.clientWidth - px('paddingLeft') - px('paddingRight')) / (r.width / 10)),
      Math.floor((this.el.clientHeight - px('paddingTop') - px('paddingBottom')) / r.height));
  }
  resize(cols, rows) {
    cols = Math.max(10, Math.min(500, cols));
    rows = Math.max(2, Math.min(200, rows));
    if (cols === this.cols && rows === this.rows) return;
    this.cols = cols;
    for (const g of [this.main, this.alt]) {
      for (const l of g) {
        l.c.length = l.a.length = Math.min(l.c.length, cols);
        while (l.c.length < cols) { l.c.push(' '); l.a.push(DEF); }
        l.d = 1;
      }
      // Rows above the cursor leave at the top (to the scrollback), others at the bottom.
      const cut = Math.max(0, Math.min(g.length - rows, (g === this.lines ? this.y : g.length - 1) - rows + 1));
      const gone = g.splice(0, cut);
      if (g === this.main) this.sb.push(...gone);
      if (g === this.lines) this.y -= cut;
      g.length = Math.min(g.length, rows);
      while (g.length < rows) g.push(this.blank());
    }
    this.rows = rows;
    this.top = 0;
    this.bot = rows - 1;
    this.go(this.x, this.y);
    this.schedule();
    if (this.o.onResize) this.o.onResize(cols, rows);
  }

  // ---------- drawing, once per animation frame ----------
  schedule() { if (!this.raf) this.raf = requestAnimationFrame(() => this.render()); }
  render() {
    this.raf = 0;
    const el = this.el, end = el.scrollHeight - el.scrollTop - el.clientHeight < 8, R = this.scr.children;
    if (this.sb.length) {
      this.sbEl.append(...this.sb.splice(0).slice(-SB).map((l) => this.row(div(), l, -1)));
      for (let k = this.sbEl.childElementCount - SB; k > 0; k--) this.sbEl.firstChild.remove();
    }
    this.sbEl.hidden = this.lines === this.alt; // as in xterm: no scrollback in full-screen programs
    while (R.length < this.rows) this.scr.append(div());
    while (R.length > this.rows) this.scr.lastChild.remove();
    const cy = this.m.cur ? this.y : -1;
    this.lines.forEach((l, i) => {
      if (R[i].line !== l || l.d || i === cy || i === this.cy) this.row(R[i], l, i === cy ? this.x : -1);
      R[i].line = l;
      l.d = 0;
    });
    this.cy = cy;
    if (end) el.scrollTop = el.scrollHeight; // follows the output unless scrolled up
  }
  row(d, l, cx) {
    const kids = [];
    for (let i = 0, j; i < l.c.length; i = j) {
      for (j = i + 1; i !== cx && j < l.c.length && j !== cx && l.a[j] === l.a[i];) j++;
      const t = l.c.slice(i, j).join(''), k = (cls(l.a[i]) + (i === cx ? ' cur' : '')).trim();
      if (!k) { kids.push(t); continue; }
      const s = document.createElement('span');
      s.className = k;
      s.textContent = t;
      kids.push(s);
    }
    d.replaceChildren(...kids);
    return d;
  }

  // ---------- keyboard ----------
  send(s) {
    this.el.scrollTop = this.el.scrollHeight;
    if (this.o.onData) this.o.onData(s);
  }
  key(e) {
    const k = e.key, c = e.ctrlKey, s = e.shiftKey, g = e.getModifierState('AltGraph');
    const a = e.altKey && !g, mod = 1 + s + 2 * a + 4 * c;
    let out = null;
    if (e.isComposing || e.metaKey) return; // Cmd shortcuts stay the browser's
    if (s && (k === 'PageUp' || k === 'PageDown')) { // scrolls the scrollback
      e.preventDefault();
      this.el.scrollTop += (k === 'PageUp' ? -0.9 : 0.9) * this.el.clientHeight;
      return;
    }
    if (k in KEYS) out = mod > 1 ? `\x1b[1;${mod}${KEYS[k]}` : (this.m.app || k[0] === 'F' ? '\x1bO' : '\x1b[') + KEYS[k];
    else if (k in TILDE) out = `\x1b[${TILDE[k]}${mod > 1 ? ';' + mod : ''}~`;
    else if (k === 'Enter') out = '\r';
    else if (k === 'Backspace') out = c ? '\b' : '\x7f';
    else if (k === 'Tab') out = s ? '\x1b[Z' : '\t';
    else if (k === 'Escape') out = '\x1b';
    else if (c && !g) {
      // Ctrl+C with text selected copies, Ctrl+V pastes: the browser's.
      if (/^[vV]$/.test(k) || (/^[cC]$/.test(k) && String(getSelection()))) return;
      const m = /^Key([A-Z])$/.exec(e.code), ch = /^[a-z@[\\\]^_ ?]$/i.test(k) ? k : m ? m[1] : '';
      if (!ch) return;
      out = ch === '?' ? '\x7f' : String.fromCharCode(ch.toUpperCase().charCodeAt(0) & 31);
    } else if ([...k].length === 1) out = k;
    if (out === null) return;
    if (a && !(MAC && out === k)) out = '\x1b' + out; // Alt: ESC prefix (not Option+key on a Mac)
    e.preventDefault();
    this.send(out);
  }
  paste(e) {
    e.preventDefault();
    const t = e.clipboardData.getData('text/plain').replace(/\r?\n/g, '\r');
    if (t) this.send(this.m.paste ? `\x1b[200~${t.replace(/\x1b/g, '')}\x1b[201~` : t);
  }
}

// ---------- the remote shell session ----------
const OUTCOME = ['exited #', 'killed by signal #', 'timed out', 'output cap reached', 'not started', 'ended: idle for # s', 'lost'];
// "[exited 0]", "[ended: idle for 900 s]"… of an exit frame's data.
export function outcome(d) {
  const n = d.length >= 5 ? new DataView(d.buffer, d.byteOffset, d.length).getInt32(1, true) : 0;
  const detail = new TextDecoder().decode(d.subarray(5)), o = OUTCOME[d[0]] || `ended (outcome ${d[0]})`;
  return '[' + o.replace('#', n) + (detail && d[0] !== 0 && d[0] !== 5 ? ': ' + detail : '') + ']';
}
// An input frame: kind (u8) | len (u32 LE) | data.
function frame(kind, data) {
  const f = new Uint8Array(5 + (data ? data.length : 0));
  f[0] = kind;
  new DataView(f.buffer).setUint32(1, f.length - 5, true);
  if (data) f.set(data, 5);
  return f;
}
const BIN = { 'Content-Type': 'application/octet-stream' };

// A shell on worker `id` in a terminal in `box`; on: { start(), end(outcome
// line or null), error(message) }. Input is batched (every 15 ms, one POST
// in flight, in order); the session hangs up when `box` leaves the page.
export class Shell {
  constructor(id, box, on) {
    Object.assign(this, { on, q: [], ctl: new AbortController() });
    this.term = new Term(box, {
      onData: (s) => { const b = new TextEncoder().encode(s); for (let i = 0; i < b.length; i += 16384) this.push(1, b.subarray(i, i + 16384)); },
      onResize: (c, r) => { const d = new DataView(new ArrayBuffer(4)); d.setUint16(0, c, true); d.setUint16(2, r, true); this.push(2, new Uint8Array(d.buffer)); },
    });
    this.unload = () => { if (this.hex) fetch(this.url(), { method: 'POST', keepalive: true, credentials: 'same-origin', headers: BIN, body: frame(3) }); };
    addEventListener('pagehide', this.unload);
    this.watch = setInterval(() => { if (!box.isConnected) this.close(); }, 1000);
    this.run(id);
  }
  url() { return `/api/v1/shell-sessions/${this.hex}/input`; }
  push(kind, data) {
    if (this.done) return;
    this.q.push(frame(kind, data));
    this.kick();
  }
  kick() { if (!this.timer && !this.busy) this.timer = setTimeout(() => this.flush(), 15); }
  async flush() {
    this.timer = 0;
    if (!this.hex || !this.q.length) return; // frames wait for the session id
    this.busy = true;
    try {
      await api('POST', this.url().slice(7), new Blob(this.q.splice(0), { type: BIN['Content-Type'] }));
    } catch (e) {
      // 404, 410: the session is over (its exit frame says how).
      if (!this.done && e.status !== 404 && e.status !== 410) this.on.error('Input not delivered: ' + e.message);
    }
    this.busy = false;
    if (this.q.length) this.kick();
    else if (this.closing) this.ctl.abort();
  }
  // Hangs up (Close): the output is no longer needed.
  close() {
    if (this.closing) return;
    this.closing = true;
    if (this.hex && !this.done) this.push(3);
    else this.ctl.abort();
    setTimeout(() => this.ctl.abort(), 3000);
    this.end(null);
  }
  end(line) {
    if (this.done) return;
    this.done = true;
    clearInterval(this.watch);
    removeEventListener('pagehide', this.unload);
    if (this.term.ro) this.term.ro.disconnect();
    if (line) this.term.write(`\r\n\x1b[0;2m${line}\x1b[0m`);
    this.on.end(line);
  }
  async run(id) {
    const t = this.term;
    try {
      const r = await fetch(`/api/v1/workers/${enc(id)}/shell`, {
        method: 'POST', credentials: 'same-origin', signal: this.ctl.signal,
        headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ cols: t.cols, rows: t.rows }),
      });
      if (r.status === 401) { this.end(null); return signedOut('Your session ended. Sign in again.'); }
      if (!r.ok) {
        const text = await r.text();
        let m = text;
        try { m = JSON.parse(text).error; } catch (_) { /* plain text */ }
        this.on.error(m || 'HTTP ' + r.status);
        return this.end(null);
      }
      this.hex = r.headers.get('X-Aerekos-Shell-Session');
      this.on.start();
      this.kick(); // what was typed meanwhile
      const rd = r.body.getReader();
      let buf = new Uint8Array(0);
      for (let c = await rd.read(); !c.done; c = await rd.read()) {
        const b = new Uint8Array(buf.length + c.value.length);
        b.set(buf);
        b.set(c.value, buf.length);
        let o = 0;
        for (let len; b.length - o >= 5 && b.length - o - 5 >= (len = new DataView(b.buffer, o + 1, 4).getUint32(0, true)); o += 5 + len) {
          const data = b.subarray(o + 5, o + 5 + len);
          if (b[o] === 1 || b[o] === 2) t.write(data);
          else if (b[o] === 3) return this.end(outcome(data));
        }
        buf = b.slice(o);
      }
      this.end('[lost: the stream ended without an exit]');
    } catch (e) {
      if (!this.ctl.signal.aborted) this.end('[lost: ' + e.message + ']');
    }
  }
}
