"""The dashboard's one page: plain HTML, CSS and a small script, nothing from a CDN.

The script polls ``api/stats`` every two seconds, fills the tables (the posts to settle
among them), shows Redis's warnings above them (it refuses every change, and why; a
policy that deletes keys, or full), and draws the depth and latency history as inline SVG lines, each point placed
by its time. A ``?token=`` it was opened with is kept for the tab (sessionStorage)
and taken out of the address bar; figures it could not read again are greyed out and
dated ("stale since ...").
"""

from __future__ import annotations

__all__ = ["PAGE_HTML"]

PAGE_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>persona dashboard</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 20px;display:flex;gap:20px;align-items:baseline}
header h1{font-size:18px;margin:0} #updated{opacity:.7;font-size:12px}
main{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:14px;padding:14px}
section{background:#fff;border-radius:6px;padding:10px 14px;box-shadow:0 1px 2px #0002;overflow-x:auto}
h2{font-size:14px;margin:0 0 8px;text-transform:uppercase;letter-spacing:.04em;color:#556}
table{border-collapse:collapse;width:100%} td,th{padding:3px 6px;text-align:left;border-bottom:1px solid #eee}
th,td.n{white-space:nowrap} .w{overflow-wrap:anywhere}  /* only long ids and messages wrap mid-word, never numbers or headers */
td.n{text-align:right;font-variant-numeric:tabular-nums} .big{font-size:26px;font-weight:600}
.figs{display:flex;gap:24px;flex-wrap:wrap} .fig span{display:block;color:#667;font-size:12px}
svg{width:100%;height:150px;background:#fbfbfd;border:1px solid #eee} .bad{color:#b00020}
#redis-warning{background:#fff4e5;color:#8a3c00;padding:8px 20px;margin:0;white-space:pre-line} #redis-warning:empty{display:none}
button{font:inherit;padding:2px 8px;cursor:pointer} main.stale{opacity:.45;filter:grayscale(1)} .legend span{margin-right:12px;font-size:12px}
</style></head><body>
<header><h1>persona</h1><span id="updated">connecting...</span><span id="error" class="bad"></span></header>
<p id="redis-warning"></p>
<main>
<section><h2>Queue</h2><div class="figs">
 <div class="fig"><div class="big" id="waiting-total">-</div><span>waiting</span></div>
 <div class="fig"><div class="big" id="inflight-total">-</div><span>in flight</span></div>
 <div class="fig"><div class="big" id="oldest">-</div><span>oldest waiting</span></div>
 <div class="fig"><div class="big" id="throughput">-</div><span id="throughput-label">replies/s</span></div>
 <div class="fig"><div class="big" id="dead-count">-</div><span>dead letters</span></div>
 <div class="fig"><div class="big" id="stuck-count">-</div><span>stuck</span></div></div>
 <table id="streams"><thead><tr><th>stream</th><th>waiting</th><th>in flight</th><th>oldest</th><th>withdrawn</th><th>expired</th></tr></thead><tbody></tbody></table>
 <p id="counters"></p></section>
<section><h2 id="latency-title">Latency (ms)</h2>
 <table id="latency"><thead><tr><th></th><th>p50</th><th>p95</th><th>p99</th></tr></thead><tbody></tbody></table></section>
<section><h2>Depth over time</h2><svg id="depth-chart" viewBox="0 0 600 150" preserveAspectRatio="none"></svg>
 <div class="legend" id="depth-legend"></div></section>
<section><h2>Latency p95 over time (ms)</h2><svg id="latency-chart" viewBox="0 0 600 150" preserveAspectRatio="none"></svg>
 <div class="legend"><span style="color:#2a6fdb">queue wait</span><span style="color:#d9480f">generation</span></div></section>
<section><h2>Workers</h2><p id="workers-note"></p><table id="workers"><thead><tr><th>worker</th><th>host</th><th>device</th><th>version</th><th>state</th>
 <th>personas</th><th>requests</th><th>MB</th><th>seen</th></tr></thead><tbody></tbody></table></section>
<section><h2>Personas</h2><table id="personas"><thead><tr><th>persona</th><th>active</th><th>versions</th><th>replies</th><th>problem</th></tr></thead><tbody></tbody></table></section>
<section><h2>Dead letters</h2><p id="dead-note" class="bad"></p><p><button id="retry-all">retry all</button> <span id="dead-shown"></span></p>
 <table id="dead"><thead><tr><th>request</th><th>persona</th><th>deliveries</th><th>reason</th><th></th></tr></thead><tbody></tbody></table></section>
<section><h2>Stuck work</h2><table id="stuck"><thead><tr><th>request</th><th>worker</th><th>held</th><th>why</th></tr></thead><tbody></tbody></table></section>
<section style="grid-column:1/-1"><h2>Posts to settle</h2><p id="posts-note"></p>
 <table id="posts"><thead><tr><th>persona</th><th>slot</th><th>sink</th><th>text</th><th>what happened</th><th>what to do</th></tr></thead><tbody></tbody></table></section>
</main>
<script>
// The token the page was opened with (?token=) is kept for this tab only and taken out of
// the address bar at once: a wall screen, the history and a proxy's log would show it.
function takeToken(){
  const given = new URLSearchParams(location.search).get('token');
  let kept = null;
  try {
    if (given) sessionStorage.setItem('persona-token', given);
    kept = sessionStorage.getItem('persona-token');
  } catch (e) {}  // storage turned off: this page's own reads still have the token given
  if (given) history.replaceState(null, '', location.pathname);
  return given || kept;
}
const token = takeToken();
const headers = token ? {'Authorization': 'Bearer ' + token} : {};
const colors = ['#2a6fdb', '#d9480f', '#2b8a3e', '#862e9c'];
function esc(v){return String(v).replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));}
function wrap(v){return '<span class="w">' + esc(v) + '</span>';}  // a long id or message: may break anywhere
function rows(id, list, cells){
  document.querySelector('#' + id + ' tbody').innerHTML =
    list.map(item => '<tr>' + cells(item).map(c => c[0] === '#' ? '<td class="n">' + esc(c.slice(1)) + '</td>' : '<td>' + c + '</td>').join('') + '</tr>').join('');
}
// Points are placed by when they were sampled (t), the right edge the latest, the left
// edge the history's reach: a gap in sampling shows as one, not as evenly spaced points.
function line(points, max, color, last, reach){
  if (points.length < 2) return '';
  const d = points.map(([t, v], i) => (i ? 'L' : 'M') + (600 - 600 * (last - t) / reach).toFixed(1) + ' ' +
                       (145 - 140 * v / max).toFixed(1)).join(' ');
  return '<path d="' + d + '" fill="none" stroke="' + color + '" stroke-width="2" vector-effect="non-scaling-stroke"/>';
}
function chart(id, series, history, reach){
  const max = Math.max(1, ...series.flatMap(s => history.map(s.value)));
  const last = history.length ? history[history.length - 1].t : 0;
  document.getElementById(id).innerHTML = series.map(s => line(history.map(h => [h.t, s.value(h)]), max, s.color, last, reach)).join('') +
    '<text x="4" y="12" font-size="11" fill="#667">' + Math.round(max) + '</text>';
}
async function act(url){
  const r = await fetch(url, {method: 'POST', headers: Object.assign({'X-Persona-Action': '1'}, headers)});
  const body = await r.json().catch(() => ({}));
  await refresh();  // first: a refresh clears the line below
  const full = Object.entries(body.full || {}).map(([k, v]) => v + ' for ' + k + ', which is full').join(', ');
  const note = !r.ok ? 'failed: ' + (body.detail || r.status)
    : body.left ? body.left + ' left: ' + [full, body.unreadable ? body.unreadable + ' unreadable' : ''].filter(Boolean).join(', ') : '';
  if (note) document.getElementById('error').textContent = note;
}
function render(data){
  const s = data.stats, lat = s.latency;
  const sum = k => s.streams.reduce((a, x) => a + x[k], 0);
  document.getElementById('waiting-total').textContent = sum('waiting');
  document.getElementById('inflight-total').textContent = sum('in_flight');
  document.getElementById('oldest').textContent = Math.max(...s.streams.map(x => x.oldest_waiting_s)).toFixed(1) + 's';
  document.getElementById('throughput').textContent = lat ? lat.replies_per_s.toFixed(2) : '-';
  // The spans the figures were measured over, as `persona queue stats` says them: the reply
  // log may reach less far back than the window (it keeps the last replies only).
  const span = lat ? Math.min(data.throughput_window_s, lat.window_s) : 0;
  document.getElementById('throughput-label').textContent = 'replies/s' + (!lat ? ''
    : span >= data.throughput_window_s ? ' (last ' + Math.round(span) + ' s)' : ' (last ' + Math.round(span) + ' s: all the reply log holds)');
  document.getElementById('latency-title').textContent = 'Latency (ms' + (lat ? ', last ' + Math.round(lat.window_s) + ' s' : '') + ')';
  document.getElementById('dead-count').textContent = s.dead_letters;
  document.getElementById('dead-note').textContent = data.dead_note || '';  // trimmed at the cap, or near it
  document.getElementById('stuck-count').textContent = s.stuck.length;
  // A Redis that refuses every change (full, unable to save to disk, a replica), or that deletes keys to
  // make room (maxmemory-policy): what to fix, above everything, in the order `persona queue stats` says it.
  document.getElementById('redis-warning').textContent = (s.redis_warnings || []).join('\\n');
  // Withdrawn and expired: not taken yet and no longer wanted (a worker discards them), so not waiting.
  rows('streams', s.streams, x => [esc(x.label), '#' + x.waiting, '#' + x.in_flight, '#' + x.oldest_waiting_s.toFixed(1) + 's',
                                   '#' + x.withdrawn, '#' + x.expired]);
  const failed = Object.entries(s.counters).filter(([k]) => k.startsWith('failed:'));
  document.getElementById('counters').textContent = 'completed ' + (s.counters.completed || 0) + ', tokens ' + (s.counters.tokens || 0) +
    ', withdrawn ' + (s.counters.withdrawn || 0) + ', expired ' + (s.counters.expired || 0) +
    // Turned away as they came (never queued): the queue full, or their user's share waiting.
    ', refused ' + (s.refused || 0) + ' (queue full ' + (s.refused_full || 0) + ", user's share " + (s.refused_user_share || 0) + ')' +
    (failed.length ? ', ' + failed.map(([k, v]) => k + ' ' + v).join(', ') : '');
  // Nothing measured in the window: a dash, as `persona queue stats` shows, not 0 ms (which reads as instant).
  rows('latency', lat ? [['queue wait', lat.queue_ms, lat.queue_waits], ['generation', lat.generate_ms, lat.replies]] : [],
       ([n, p, count]) => [n, ...[p.p50, p.p95, p.p99].map(v => '#' + (count ? Math.round(v) : '-'))]);
  const now = s.redis_time || Date.now() / 1000;  // heartbeats are stamped by Redis's clock
  // Workers still loading their models are listed after the live ones: they serve nothing yet.
  const starting = s.starting_workers || [];
  rows('workers', s.workers.concat(starting), w => w.loading_s === undefined
       ? [esc(w.id), esc(w.host), esc(w.device), esc(w.version || '-'), esc(w.state),
          esc(Object.entries(w.personas).map(([p, v]) => p + '@' + v).join(', ') || '-'), '#' + w.requests,
          '#' + Math.round(w.memory_mb), '#' + (now - w.last_seen).toFixed(1) + 's']
       : [esc(w.id), esc(w.host), esc(w.device), esc(w.version || '-'), 'starting (' + Math.round(w.loading_s) + 's)',
          esc(w.persona ? 'loading ' + (w.model || 'the model') + ' for ' + w.persona : 'starting up'), '#-', '#-',
          '#' + Math.max(0, now - w.last_seen).toFixed(1) + 's']);
  const live = s.workers.length + s.unreadable_workers.length;
  document.getElementById('workers-note').textContent = live + ' live' + (starting.length ? ', ' + starting.length + ' starting' : '') +
    // While Redis refuses changes, running workers cannot write their heartbeats: "start one" misled.
    (live ? '' : s.writes_refused ? ': no worker can be listed while Redis refuses changes (see above): their heartbeats '
        + 'are refused too, so running workers go unseen; they are listed again once Redis takes changes'
     : starting.length ? ': no worker serves yet; requests wait until a starting one has loaded its models'
     : ': nothing is answered; start one with `persona worker` (or `persona up`)');
  // A persona no worker can load (its base folder gone...) says why; a file, or a folder of them, that cannot be
  // read is listed too: it was simply absent, as if there were no such file.
  rows('personas', data.personas.concat((data.invalid_personas || []).map(problem => ({invalid: problem}))), p => p.invalid
       ? ['<span class="bad">unreadable file or folder</span>', '-', '-', '#-', '<span class="bad w">' + esc(p.invalid) + '</span>']
       : [esc(p.name), '<b>' + esc(p.active) + '</b>', esc(p.versions.join(', ') || '-'),
          '#' + Object.entries(s.version_replies).filter(([k]) => k.split('@')[0] === p.name).map(([k, v]) => k.split('@')[1] + ': ' + v).join(', '),
          p.problem ? '<span class="bad w">' + esc(p.problem) + '</span>' : '-']);
  // The newest only: the page says so, not a table of 50 under "304 dead letters".
  document.getElementById('dead-shown').textContent = data.dead.length < s.dead_letters
    ? 'the newest ' + data.dead.length + ' of ' + s.dead_letters + ' shown (`persona queue dead --limit ' + s.dead_letters + '` lists them all)' : '';
  rows('dead', data.dead, d => ['<span title="' + esc(d.request_id) + '">' + esc((d.request_id || '(malformed)').slice(0, 12)) + '</span>', esc(d.persona), '#' + d.deliveries, wrap(d.reason),
       (d.request_id ? '<button data-id="' + esc(d.id) + '" data-do="retry">retry</button> ' : '') +
       '<button data-id="' + esc(d.id) + '" data-do="drop">drop</button>']);
  document.querySelectorAll('#dead button').forEach(b => b.onclick = () => {
    // Dropping deletes the request for good: asked first, as `persona queue drop` does for many.
    if (b.dataset.do === 'drop' && !confirm('Delete dead letter ' + b.dataset.id + ' for good?')) return;
    act('api/dead/' + b.dataset.id + '/' + b.dataset.do);
  });
  // Posts a sink never answered (`persona posts uncertain`): X and Telegram may have posted them.
  const posts = data.posts_to_settle || [], note = document.getElementById('posts-note');
  note.textContent = posts.length ? posts.length + ' post(s) got no answer; each waits for what its last column says' : 'none';
  note.className = posts.some(x => x.state === 'uncertain') ? 'bad' : '';
  rows('posts', posts, x => [esc(x.persona), esc(x.slot), esc(x.sink), wrap(x.text),
       wrap((x.state === 'uncertain' ? 'no answer; it may be posted: ' : 'no answer (safe to post again): ') + x.error),
       (x.state === 'uncertain' ? 'look on ' + esc(x.sink) + ', then ' : '') + '<code class="w">' + esc(x.command) + '</code>' +
       (x.state === 'uncertain' ? ' (or <code>--not-posted</code>)' : '')]);
  rows('stuck', s.stuck, x => [wrap(x.request_id), wrap(x.worker), '#' + x.held_s + 's', wrap(x.reason)]);
  const names = s.streams.map(x => x.name);
  chart('depth-chart', names.map((n, i) => ({color: colors[i % 4], value: h => h.depth[n] || 0})), data.history, data.history_window_s);
  document.getElementById('depth-legend').innerHTML = s.streams.map((x, i) => '<span style="color:' + colors[i % 4] + '">' + esc(x.label) + '</span>').join('');
  chart('latency-chart', [{color: colors[0], value: h => h.queue_p95}, {color: colors[1], value: h => h.generate_p95}],
        data.history, data.history_window_s);
  document.getElementById('updated').textContent = 'updated ' + new Date().toLocaleTimeString([], {hour12: false});
}
let readAt = null;  // when the figures shown were read
function stale(said){
  // The figures shown are old: greyed out and dated, not shown as if live beside a small red line.
  document.querySelector('main').classList.add('stale');
  const since = readAt ? 'stale since ' + readAt.toLocaleTimeString([], {hour12: false}) : 'no figures yet';
  document.getElementById('updated').textContent = since;
  document.getElementById('error').textContent = (readAt ? 'the figures below are ' + since + ': ' : '') + said;
}
async function refresh(){
  try {
    const r = await fetch('api/stats', {headers});
    if (!r.ok) {  // the dashboard answered: say what it said (Redis down, a wrong token)
      const body = await r.json().catch(() => ({}));
      return stale(body.detail || ('the dashboard answered HTTP ' + r.status));
    }
    render(await r.json());
    readAt = new Date();
    document.querySelector('main').classList.remove('stale');
    document.getElementById('error').textContent = '';
  } catch (e) { stale('cannot reach the dashboard: ' + e.message); }
}
document.getElementById('retry-all').onclick = () => {
  // Every dead letter goes back on the queue at once: asked first (a stray click, or one made in a frame).
  if (confirm('Re-queue all ' + document.getElementById('dead-count').textContent + ' dead letters?')) act('api/dead/retry-all');
};
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""
