// The Artifacts section of the services page: uploaded programs by
// SHA-256 and architecture.
import { $, api, AuthError, dash, enc, fmt, h, setText, toast } from './core.js';

export const short = (sha) => String(sha).slice(0, 12);

// The section; `s` is the services page's state (`s.refresh` polls again).
export function artifactsPanel(s) {
  return h('section', { class: 'panel arts', 'aria-labelledby': 'art-h' },
    h('h2', { id: 'art-h', text: 'Artifacts' }),
    h('p', { class: 'muted small', text: 'Programs for process services, one file per architecture; workers download the one for their architecture and check its SHA-256.' }),
    h('table', { class: 'svc-table', id: 'art-table', hidden: true },
      h('thead', {}, h('tr', {}, ['Name', 'Arch', 'SHA-256', 'Size', 'Uploaded', 'Action'].map((t) => h('th', { text: t })))),
      h('tbody', { id: 'art-rows' })),
    h('p', { class: 'muted small', id: 'art-empty' }),
    h('form', { class: 'row', id: 'art-form', novalidate: true, onsubmit: (ev) => uploadArtifact(ev, s) },
      h('div', { class: 'field' }, h('label', { for: 'art-file', text: 'File' }), h('input', { id: 'art-file', type: 'file' })),
      h('div', { class: 'field' }, h('label', { for: 'art-arch', text: 'Architecture' }),
        h('input', { id: 'art-arch', list: 'arch-list', autocomplete: 'off', spellcheck: 'false', placeholder: 'aarch64' }),
        h('datalist', { id: 'arch-list' })),
      h('div', { class: 'field' }, h('label', { for: 'art-name', text: 'Name' }),
        h('input', { id: 'art-name', maxlength: 128, autocomplete: 'off', placeholder: 'the file name' })),
      h('button', { type: 'submit', id: 'art-upload', text: 'Upload' })),
    h('p', { class: 'error', id: 'art-error', role: 'alert' }));
}

// Redraws the table when the list changed; `true` if it did.
export function renderArtifacts(s, fleet) {
  const key = JSON.stringify(s.arts);
  if (s.artKey === key) return false;
  s.artKey = key;
  $('#art-rows').replaceChildren(...s.arts.map((a) => {
    const td = (label, t, cls) => h('td', { 'data-label': label, class: cls, text: t });
    return h('tr', { 'data-sha': a.sha256 }, td('Name', a.name || dash), td('Arch', a.arch), td('SHA-256', a.sha256, 'mono sha'),
      td('Size', fmt.bytes(a.size)), td('Uploaded', fmt.time(a.created_ms)),
      h('td', { 'data-label': 'Action' }, h('button', { type: 'button', class: 'danger', text: 'Delete',
        'aria-label': `Delete artifact ${a.name || short(a.sha256)} (${a.arch})`, onclick: () => deleteArtifact(a, s) })));
  }));
  $('#art-table').hidden = !s.arts.length;
  setText($('#art-empty'), s.arts.length ? '' : 'No artifacts uploaded.');
  const arches = [...new Set(fleet.map((w) => w.arch).concat(s.arts.map((a) => a.arch)).filter(Boolean))];
  $('#arch-list').replaceChildren(...arches.map((a) => h('option', { value: a })));
  return true;
}
async function uploadArtifact(ev, s) {
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
    s.refresh();
  } catch (e) {
    if (!(e instanceof AuthError)) setText(err, 'Not uploaded: ' + e.message);
  } finally {
    btn.disabled = false;
    setText(btn, 'Upload');
  }
}
async function deleteArtifact(a, s) {
  setText($('#art-error'), '');
  try {
    await api('DELETE', '/artifacts/' + a.sha256);
    toast(`Artifact ${a.name || short(a.sha256)} deleted`);
    $('#art-file').focus();
    s.refresh();
  } catch (e) {
    if (!(e instanceof AuthError)) setText($('#art-error'), 'Not deleted: ' + e.message);
  }
}
