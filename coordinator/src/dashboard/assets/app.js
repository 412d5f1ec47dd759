// homeport dashboard: plain JavaScript, no build step. Everything it shows and does goes
// through the coordinator's admin API (/api/v1/admin/...), the same one the CLI uses.
'use strict';

const POLL_MS = 1500; // live without reload: a new connection shows within ~2 s of the exit's report
let csrf = null;
let timer = null;
let lastNodesKey = '';

const $ = (id) => document.getElementById(id);

// Builds an element; children are nodes or text (never parsed as HTML).
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

class ApiError extends Error {
  constructor(status, error, detail) { super(detail); this.status = status; this.error = error; this.detail = detail; }
}

async function api(method, path, body) {
  const headers = { 'Accept': 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (csrf && method !== 'GET') headers['X-Homeport-CSRF'] = csrf;
  const resp = await fetch(path, { method, headers, credentials: 'same-origin',
    body: body === undefined ? undefined : JSON.stringify(body) });
  if (resp.status === 204) return null;
  let data = null;
  try { data = await resp.json(); } catch (_) { data = null; }
  if (!resp.ok) {
    if (resp.status === 401 && !path.startsWith('/dashboard/login')) showLogin();
    throw new ApiError(resp.status, data && data.error, (data && data.detail) || resp.statusText);
  }
  return data;
}

function bytes(n) {
  if (n === null || n === undefined) return '';
  const u = ['B', 'KB', 'MB', 'GB', 'TB'];
  let i = 0; let v = n;
  while (v >= 1000 && i < u.length - 1) { v /= 1000; i++; }
  return i === 0 ? `${n} B` : `${v.toFixed(1)} ${u[i]}`;
}

function ago(secs) {
  if (secs === null || secs === undefined) return 'never';
  if (secs < 60) return `${secs} s ago`;
  if (secs < 3600) return `${Math.floor(secs / 60)} min ago`;
  if (secs < 86400) return `${Math.floor(secs / 3600)} h ago`;
  return `${Math.floor(secs / 86400)} d ago`;
}

function duration(secs) {
  if (secs === null || secs === undefined) return '?';
  if (secs < 60) return `${secs} s`;
  if (secs < 3600) return `${Math.floor(secs / 60)} min ${secs % 60} s`;
  return `${Math.floor(secs / 3600)} h ${Math.floor((secs % 3600) / 60)} min`;
}

// ---- login ----

function showLogin() {
  csrf = null;
  if (timer) { clearInterval(timer); timer = null; }
  $('app-view').classList.add('hidden');
  $('logout').classList.add('hidden');
  $('login-view').classList.remove('hidden');
  $('login-token').focus();
}

function showApp() {
  $('login-view').classList.add('hidden');
  $('app-view').classList.remove('hidden');
  $('logout').classList.remove('hidden');
  refresh();
  if (!timer) timer = setInterval(refresh, POLL_MS);
}

$('login-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  $('login-error').textContent = '';
  try {
    const r = await api('POST', '/dashboard/login', { token: $('login-token').value });
    csrf = r.csrf;
    $('login-token').value = '';
    showApp();
  } catch (e) {
    $('login-error').textContent = e.detail || String(e);
  }
});

$('logout').addEventListener('click', async () => {
  try { await api('POST', '/dashboard/logout'); } catch (_) { /* gone anyway */ }
  showLogin();
});

// ---- rendering ----

function pathCell(p) {
  if (p.path === 'direct') return h('span', { class: 'path-direct' }, `direct ${p.addr || ''}`);
  if (p.path === 'relay') return h('span', { class: 'path-relay', title: p.reason || '' }, `relay: ${p.reason || ''}`);
  return h('span', { class: 'path-none' }, 'no path yet');
}

function renderHealth(o) {
  $('versions').textContent = o.coordinator_version;
  $('updated').textContent = `updated ${new Date(o.now * 1000).toLocaleTimeString()}`;
  const exits = o.nodes.filter((n) => n.exit);
  const total = o.relayed_paths + o.direct_paths;
  $('health').replaceChildren(h('div', { class: 'health' },
    h('div', {}, h('div', { class: 'muted' }, 'Coordinator'), o.coordinator_version,
      o.join_url ? h('div', { class: 'muted' }, o.join_url) : null),
    exits.length === 0 ? h('div', {}, h('div', { class: 'muted' }, 'Exit'), h('span', { class: 'warn' }, 'no exit has reported yet'))
      : exits.map((n) => h('div', { 'data-exit': n.name },
        h('div', { class: 'muted' }, `Exit ${n.name}`), n.exit.version, h('br'),
        n.exit.rules_in_sync ? h('span', { class: 'on', 'data-rules': 'applied' }, 'rules applied')
          : h('span', { class: 'bad', 'data-rules': 'pending' }, n.exit.error ? `rules not applied: ${n.exit.error}` : 'rules not applied yet'),
        n.exit.reported_secs_ago > 10 ? h('span', { class: 'warn' }, ` (report ${ago(n.exit.reported_secs_ago)})`) : null)),
    h('div', { 'data-relay-use': '' }, h('div', { class: 'muted' }, 'Relay use'),
      total === 0 ? 'no paths reported' : `${o.relayed_paths} of ${total} peer paths relayed`)));
}

let removeArmed = null; // a two-step remove: first click arms, second confirms

function armButton(key, label, onConfirm) {
  const armed = removeArmed === key;
  return h('button', { type: 'button', class: 'danger', 'data-remove': key, onclick: async (ev) => {
    if (removeArmed !== key) { removeArmed = key; ev.target.textContent = 'Click again to confirm'; return; }
    removeArmed = null;
    try { await onConfirm(); } catch (e) { alertLine(e); }
    refresh();
  } }, armed ? 'Click again to confirm' : label);
}

function alertLine(e) { $('updated').textContent = `error: ${e.detail || e}`; }

function renderNodes(o) {
  const rows = [];
  for (const n of o.nodes) {
    const stale = n.reported_secs_ago === null || n.reported_secs_ago > 10;
    rows.push(h('tr', { 'data-node': n.name },
      h('td', {}, h('strong', {}, n.name), h('br'), h('span', { class: 'muted' }, n.version || 'not reporting')),
      h('td', {}, n.addrs.ipv4, h('br'), h('span', { class: 'muted' }, n.addrs.ipv6)),
      h('td', {}, n.online ? h('span', { class: 'pill on' }, 'online') : h('span', { class: 'pill off' }, `offline, seen ${n.last_seen ? ago(o.now - n.last_seen) : 'never'}`)),
      h('td', {}, n.tags.length ? n.tags.map((t) => `tag:${t}`).join(' ') : h('span', { class: 'muted' }, '—')),
      h('td', {}, n.endpoints.map((e) => h('div', {}, `${e.addr} `, h('span', { class: 'muted' }, e.kind)))),
      h('td', {}, n.peers.length === 0 ? h('span', { class: 'muted' }, stale ? 'no report' : 'no peers')
        : h('table', { class: 'peers' }, n.peers.map((p) => h('tr', { 'data-peer': p.peer_name },
          h('td', {}, `→ ${p.peer_name}`),
          h('td', { class: 'path' }, pathCell(p)),
          h('td', {}, `handshake ${ago(p.last_handshake_secs_ago)}`),
          h('td', { class: 'num' }, `↓ ${bytes(p.rx_bytes)} ↑ ${bytes(p.tx_bytes)}`))))),
      h('td', {}, armButton(`node:${n.name}`, 'Remove', () => api('DELETE', `/api/v1/admin/nodes/${encodeURIComponent(n.name)}`)))));
  }
  $('nodes').replaceChildren(h('table', {},
    h('thead', {}, h('tr', {}, ['Node', 'Mesh addresses', 'State', 'Tags', 'Endpoints', 'Paths to peers', ''].map((t) => h('th', {}, t)))),
    h('tbody', {}, rows)));
}

function renderPublish(o) {
  if (o.publish.length === 0) {
    $('publish').replaceChildren(h('p', { class: 'muted' }, 'Nothing is published yet.'));
    return;
  }
  $('publish').replaceChildren(...o.publish.map((r) => {
    const g = r.guards || {};
    const limits = [g.rate_per_minute ? `${g.rate_per_minute} new/min per viewer` : null,
      g.max_conns ? `${g.max_conns} at once per viewer` : null].filter(Boolean).join(', ') || 'no limits';
    return h('div', { class: 'rule', id: `rule-${r.id}`, 'data-port': r.port },
      h('div', { class: 'rule-head' },
        h('strong', {}, `${r.exit_name}:${r.port}/${r.proto}`), `→ ${r.target_name}:${r.target_port}`,
        r.applied === true ? h('span', { class: 'pill on' }, 'live on the exit')
          : r.applied === false ? h('span', { class: 'pill bad' }, 'not applied on the exit') : h('span', { class: 'pill off' }, 'exit not reporting'),
        h('span', { class: 'muted' }, `allow: ${(g.allow || []).length ? g.allow.join(', ') : 'anyone'}; ${limits}`),
        armButton(`rule:${r.id}`, 'Remove', () => api('DELETE', `/api/v1/admin/publish/${r.id}`))),
      h('div', { class: 'sub' }, `Connected now (${r.live.length})`),
      r.live.length === 0 ? h('div', { class: 'muted' }, 'nobody')
        : h('table', { class: 'live' },
          h('thead', {}, h('tr', {}, ['Viewer', 'Let in by', 'From viewer', 'To viewer', 'For'].map((t) => h('th', {}, t)))),
          h('tbody', {}, r.live.map((c) => h('tr', { 'data-source': c.source },
            h('td', {}, c.source), h('td', {}, c.label), h('td', { class: 'num' }, bytes(c.bytes_in)),
            h('td', { class: 'num' }, bytes(c.bytes_out)), h('td', { class: 'num' }, duration(c.duration_secs)))))),
      r.recent.length === 0 ? null : [h('div', { class: 'sub' }, 'Recent (audit log)'),
        h('table', { class: 'recent' }, h('tbody', {}, r.recent.slice().reverse().map((l) => h('tr', { 'data-verdict': l.verdict },
          h('td', {}, l.time.replace('T', ' ').replace(/\.\d+/, '')), h('td', {}, l.source),
          h('td', { class: l.verdict === 'allowed' ? 'on' : 'bad' }, l.verdict),
          h('td', { class: 'num' }, l.verdict === 'allowed' ? `${bytes(l.bytes_in)} in, ${bytes(l.bytes_out)} out, ${l.duration_s} s` : `${l.packets} packets dropped`)))))]);
  }));
}

function fillSelect(sel, names, prefer) {
  const keep = sel.value;
  sel.replaceChildren(...names.map((n) => h('option', { value: n }, n)));
  if (names.includes(keep)) sel.value = keep;
  else if (prefer && names.includes(prefer)) sel.value = prefer;
}

function renderSelects(o) {
  const names = o.nodes.map((n) => n.name);
  const exits = o.nodes.filter((n) => n.exit).map((n) => n.name);
  const key = names.join(',') + '|' + exits.join(',');
  if (key === lastNodesKey) return;
  lastNodesKey = key;
  fillSelect($('pub-exit'), exits.length ? exits.concat(names.filter((n) => !exits.includes(n))) : names, exits[0]);
  fillSelect($('pub-target'), names, names.find((n) => !exits.includes(n)));
}

let latest = null;

async function refresh() {
  try {
    const o = await api('GET', '/api/v1/admin/overview');
    latest = o;
    renderHealth(o);
    renderSelects(o);
    renderNodes(o);
    renderPublish(o);
  } catch (e) {
    if (e.status !== 401) alertLine(e);
  }
}

// ---- forms: errors from the API go next to the field they name ----

// The API's detail starts with the field it is about ("allow[0]: invalid CIDR ...").
function fieldOf(detail) {
  const m = /^([a-z_]+)(\[\d+\])?:/.exec(detail || '');
  return m ? m[1] : null;
}

function clearErrors(form) {
  for (const el of form.querySelectorAll('.error')) el.textContent = '';
  for (const el of form.querySelectorAll('[aria-invalid]')) el.removeAttribute('aria-invalid');
}

function showError(prefix, fallbackId, e, inputs) {
  const field = fieldOf(e.detail);
  const slot = field && $(`${prefix}-${field}-error`);
  (slot || $(fallbackId)).textContent = e.detail || String(e);
  const input = field && inputs[field];
  if (input) { input.setAttribute('aria-invalid', 'true'); input.focus(); }
}

function optInt(v) {
  const t = v.trim();
  if (t === '') return undefined;
  return /^\d+$/.test(t) ? Number(t) : t; // the API names anything else
}

$('publish-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const form = ev.target;
  clearErrors(form);
  $('pub-ok').textContent = '';
  const port = optInt($('pub-port').value);
  const tport = $('pub-target-port').value.trim() || String(port ?? '');
  const body = {
    exit: $('pub-exit').value,
    port,
    proto: $('pub-proto').value,
    to: `${$('pub-target').value}:${tport}`,
    allow: $('pub-allow').value.split(/[\n,]+/).map((s) => s.trim()).filter(Boolean),
  };
  const rate = optInt($('pub-rate').value); if (rate !== undefined) body.rate_per_minute = rate;
  const max = optInt($('pub-max').value); if (max !== undefined) body.max_conns = max;
  try {
    const rule = await api('POST', '/api/v1/admin/publish', body);
    $('pub-ok').textContent = `Published ${rule.exit_name}:${rule.port} → ${rule.target_name}:${rule.target_port}`;
    form.reset();
    lastNodesKey = '';
    refresh();
  } catch (e) {
    showError('pub', 'pub-error', e, { exit: $('pub-exit'), port: $('pub-port'), proto: $('pub-proto'),
      to: $('pub-target-port'), allow: $('pub-allow'), rate_per_minute: $('pub-rate'), max_conns: $('pub-max') });
  }
});

$('authkey-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const form = ev.target;
  clearErrors(form);
  const hours = $('key-expires').value.trim();
  const body = {
    reusable: $('key-reusable').checked,
    tags: $('key-tags').value.split(',').map((s) => s.trim()).filter(Boolean),
  };
  if (hours !== '') body.expires_secs = /^\d+$/.test(hours) ? Number(hours) * 3600 : hours;
  try {
    const k = await api('POST', '/api/v1/admin/authkeys', body);
    const url = (latest && latest.join_url) || 'https://VPS_IP:8443';
    const pin = (latest && latest.pin) || 'PIN';
    $('key-lines').textContent =
      `# 1. save the key in a private file (paste it, then Ctrl-D):\n` +
      `sudo sh -c 'umask 077; cat >/root/homeport.authkey'\n${k.key}\n\n` +
      `# 2. join the mesh:\n` +
      `sudo homeport up --coordinator ${url} --pin ${pin} --authkey-file /root/homeport.authkey --hostname NAME`;
    $('key-result').classList.remove('hidden');
  } catch (e) {
    showError('key', 'key-error', e, { expires_secs: $('key-expires'), tags: $('key-tags') });
  }
});

$('key-copy').addEventListener('click', () => {
  navigator.clipboard && navigator.clipboard.writeText($('key-lines').textContent);
});
$('key-hide').addEventListener('click', () => {
  $('key-lines').textContent = '';
  $('key-result').classList.add('hidden');
});

// ---- start: a reload keeps the session (the cookie), the CSRF token comes back from it ----

(async () => {
  try {
    const r = await api('GET', '/dashboard/session');
    csrf = r.csrf;
    showApp();
  } catch (_) {
    showLogin();
  }
})();
