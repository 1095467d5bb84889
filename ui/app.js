// coordinator dashboard. Plain JavaScript, no framework, no build step.
//
// Safety rule: nothing the server returns (queue names, kinds, messages, payloads)
// is ever parsed as HTML. Every node is made with createElement and filled with
// textContent (see el()); no HTML-parsing sink is used (a unit test checks).
'use strict';

(function () {
  const KEY = 'coordinator.apiKey';
  const ROOT = new URL('../', window.location.href); // the page lives at /ui/
  const STATUSES = ['PENDING', 'QUEUED', 'RUNNING', 'COMPLETED', 'FAILED', 'CANCELLED'];
  const OPEN_STATUSES = ['PENDING', 'QUEUED', 'RUNNING'];
  const JOB_POLL_MS = 1500; // without a live stream
  const LIST_POLL_MS = 3000; // without a live stream
  const LIVE_REFRESH_MS = 30000; // with one: ages and anything a stream does not carry
  const COALESCE_MS = 250; // a burst of stream events makes one re-read
  // A job id as the server writes it (a hyphenated UUID); nothing else is shown as one.
  const JOB_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

  let timer = null; // the current view's refresh timer
  let live = null; // the current view's event stream (an AbortController)
  let generation = 0; // bumps on every navigation; stale responses are dropped
  let scopes = null; // {admin, update}: probed once per key

  // ---- DOM helpers ---------------------------------------------------------------

  /** An element; attrs are set with setAttribute, children appended as text nodes. */
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k === 'onclick') e.addEventListener('click', v);
      else if (k === 'onsubmit') e.addEventListener('submit', v);
      else e.setAttribute(k, v === true ? '' : String(v));
    }
    append(e, children);
    return e;
  }

  function append(parent, children) {
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      parent.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
  }

  function replace(node, ...children) {
    node.replaceChildren();
    append(node, children);
  }

  const view = () => document.getElementById('view');

  function notice(text, isError) {
    const n = document.getElementById('notice');
    n.textContent = text || '';
    n.className = isError ? 'error' : '';
  }

  function statusBadge(s) {
    return el('span', { class: 'status status-' + (STATUSES.includes(s) ? s : 'PENDING') }, s);
  }

  function relative(iso) {
    if (!iso) return '—';
    const t = Date.parse(iso);
    if (Number.isNaN(t)) return String(iso);
    const s = Math.round((Date.now() - t) / 1000);
    const a = Math.abs(s);
    const text = a < 60 ? a + ' s' : a < 3600 ? Math.round(a / 60) + ' min'
      : a < 86400 ? Math.round(a / 3600) + ' h' : Math.round(a / 86400) + ' d';
    return s >= 0 ? text + ' ago' : 'in ' + text;
  }

  function time(iso) {
    return iso ? el('time', { datetime: iso, title: iso }, relative(iso)) : '—';
  }

  function age(ms) {
    if (ms === null || ms === undefined) return '—';
    const s = Math.round(ms / 1000);
    return s < 60 ? s + ' s' : s < 3600 ? Math.round(s / 60) + ' min' : Math.round(s / 3600) + ' h';
  }

  function json(v) {
    return el('pre', {}, v === null || v === undefined ? 'null' : JSON.stringify(v, null, 2));
  }

  // ---- API -----------------------------------------------------------------------

  function key() {
    return window.sessionStorage.getItem(KEY) || '';
  }

  /** fetch with the key; never cookies. Resolves {status, ok, data}. */
  async function api(method, path, body) {
    const headers = { 'X-API-Key': key() };
    const init = { method, headers, credentials: 'omit', cache: 'no-store', redirect: 'error' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let r;
    try {
      r = await fetch(new URL(path, ROOT), init);
    } catch (e) {
      return { status: 0, ok: false, data: { title: 'Network error', detail: String(e) } };
    }
    const text = await r.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch (_) { data = text; }
    }
    return { status: r.status, ok: r.ok, data };
  }

  /** A Server-Sent Events stream read with fetch (EventSource cannot send the key
   *  header). onEvent(type, data) per event. `done` resolves to 'end' (the server
   *  closed the stream), 'failed' (not opened, or cut) or 'aborted'. */
  function stream(path, headers, onOpen, onEvent) {
    const ctl = new AbortController();
    const done = (async () => {
      let r;
      try {
        r = await fetch(new URL(path, ROOT), {
          headers: Object.assign({ 'X-API-Key': key(), Accept: 'text/event-stream' }, headers),
          credentials: 'omit', cache: 'no-store', redirect: 'error', signal: ctl.signal,
        });
      } catch (_) {
        return ctl.signal.aborted ? 'aborted' : 'failed';
      }
      if (!r.ok || !r.body) return 'failed';
      onOpen();
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buf = '';
      try {
        for (;;) {
          const { value, done: finished } = await reader.read();
          if (finished) return 'end';
          buf += decoder.decode(value, { stream: true });
          let at;
          while ((at = buf.indexOf('\n\n')) >= 0) {
            const block = buf.slice(0, at);
            buf = buf.slice(at + 2);
            let type = 'message';
            let data = '';
            for (const line of block.split('\n')) {
              if (line.startsWith('event: ')) type = line.slice(7);
              else if (line.startsWith('data: ')) data += line.slice(6);
            }
            if (!data) continue; // a comment (keep-alive)
            let parsed = null;
            try { parsed = JSON.parse(data); } catch (_) { parsed = null; }
            onEvent(type, parsed);
          }
        }
      } catch (_) {
        return ctl.signal.aborted ? 'aborted' : 'failed';
      }
    })();
    return { ctl, done };
  }

  function problem(r) {
    const d = r.data && typeof r.data === 'object' ? r.data : {};
    let text = (r.status || 'error') + ' ' + (d.title || '');
    if (d.detail) text += ': ' + d.detail;
    if (r.status === 401) text += ' (check the API key)';
    return text;
  }

  /** Which optional actions the key may take, asked without side effects: each probe
   *  is refused by the route's guard (403) without the scope, and by the handler
   *  (400, an invalid name or id) with it; nothing is written either way. The answer
   *  is kept only if the key is still the one it was asked with: a slow probe of a key
   *  since forgotten must not grant its scopes to the next key. */
  async function probeScopes() {
    if (scopes) return scopes;
    const asked = key();
    const [admin, update] = await Promise.all([
      api('PATCH', 'coordinator/queues/~', {}),
      api('POST', 'coordinator/jobs/~/cancel', {}),
    ]);
    const has = (r) => r.status !== 0 && r.status !== 401 && r.status !== 403;
    const found = { admin: has(admin), update: has(update) };
    if (key() === asked) scopes = found;
    return found;
  }

  // ---- routing -------------------------------------------------------------------

  /** The route in the address's hash. A malformed % escape (decodeURIComponent throws)
   *  gives the route 'unreadable', which render() shows as such: it never throws. */
  function parseHash() {
    const h = window.location.hash.replace(/^#\/?/, '');
    const [path, query] = h.split('?');
    let parts;
    try {
      parts = path.split('/').filter(Boolean).map(decodeURIComponent);
    } catch (_) {
      return { name: 'unreadable', arg: window.location.hash, params: new URLSearchParams() };
    }
    return { name: parts[0] || 'jobs', arg: parts[1], params: new URLSearchParams(query || '') };
  }

  function stop() {
    if (timer) window.clearTimeout(timer);
    timer = null;
    if (live) live.abort();
    live = null;
    generation += 1;
    return generation;
  }

  function schedule(gen, fn, ms) {
    if (gen !== generation) return;
    if (timer) window.clearTimeout(timer);
    timer = window.setTimeout(() => { if (gen === generation) fn(); }, ms);
  }

  async function render() {
    const route = parseHash(); // never throws; read before the current view is stopped
    const gen = stop();
    for (const n of ['queues', 'jobs', 'health']) {
      const a = document.getElementById('nav-' + n);
      const current = route.name === n || (n === 'jobs' && route.name === 'job');
      if (current) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
    }
    if (!key()) {
      replace(view(), el('p', {}, 'Paste an API key above to see queues, jobs and health. ' +
        'The page itself holds no data.'));
      return;
    }
    if (route.name === 'unreadable') {
      return missing('Page not found', 'This address could not be read (a malformed % escape): ',
        route.arg);
    }
    if (route.name === 'queues') return queuesView(gen);
    if (route.name === 'job' && route.arg) {
      // Anything after #/job/ would otherwise be the page's heading ("Job <text>").
      if (!JOB_ID.test(route.arg)) {
        return missing('Not a job id', 'This address names no job (job ids are UUIDs): ',
          route.arg);
      }
      return jobView(gen, route.arg);
    }
    if (route.name === 'health') return healthView(gen);
    return jobsView(gen, route.params);
  }

  /** A page for an address that names nothing: the address's text appears only in
   *  quotes inside the message (shortened), never as a heading. */
  function missing(heading, message, raw) {
    const text = String(raw);
    const shown = text.length > 80 ? text.slice(0, 80) + '…' : text;
    replace(view(),
      el('p', {}, el('a', { href: '#/jobs' }, '← Jobs')),
      el('h2', {}, heading),
      el('p', { class: 'error', id: 'missing' }, message, '“', shown, '”.'));
  }

  // ---- Queues --------------------------------------------------------------------

  async function queuesView(gen) {
    const body = el('tbody');
    const mode = el('caption', { class: 'muted', id: 'queues-live' }, 'Loading…');
    const table = el('table', { id: 'queues-table' },
      mode,
      el('thead', {}, el('tr', {},
        el('th', { scope: 'col' }, 'Queue'),
        el('th', { scope: 'col', class: 'num' }, 'Pending'),
        el('th', { scope: 'col', class: 'num' }, 'Queued'),
        el('th', { scope: 'col', class: 'num' }, 'Running / max'),
        el('th', { scope: 'col', class: 'num' }, 'Oldest queued'),
        el('th', { scope: 'col' }, 'State'),
        el('th', { scope: 'col' }, 'Actions'))),
      body);
    const state = el('p', { class: 'muted' });
    // Setting a queue's limit: one form under the table (a live refresh replaces the
    // rows, never what is being typed here). Any queue name may be given, so a limit
    // can be set before the queue has jobs. Shown only to a key with admin.
    const limitQueue = el('input', { id: 'limit-queue', required: true, maxlength: 64,
      autocomplete: 'off', spellcheck: 'false' });
    const limitValue = el('input', { id: 'limit-value', type: 'number', min: 1, max: 1000000,
      step: 1, placeholder: 'no limit' });
    const limitForm = el('form', {
      id: 'limit-form', class: 'filters', hidden: true,
      onsubmit: (e) => {
        e.preventDefault();
        setLimit(gen, limitQueue.value, limitValue, load);
      },
    },
    el('label', {}, 'Queue', limitQueue),
    el('label', {}, 'Max running (empty: no limit)', limitValue),
    el('button', { type: 'submit', id: 'limit-set' }, 'Set limit'));
    replace(view(), el('h2', {}, 'Queues'), state, table, limitForm);

    let dirty = false; // a stream event arrived while a read was under way
    const load = async () => {
      dirty = false;
      const [r, s] = await Promise.all([api('GET', 'coordinator/queues'), probeScopes()]);
      if (gen !== generation) return;
      if (!r.ok) {
        replace(state, el('span', { class: 'error' }, problem(r)));
        body.replaceChildren();
        return schedule(gen, load, LIST_POLL_MS * 2);
      }
      replace(state, s.admin ? 'Your key has admin: you can pause, resume and limit queues.'
        : 'Your key lacks admin: queues are read-only.');
      limitForm.hidden = !s.admin;
      const queues = r.data.queues || [];
      const rows = queues.map((q) => {
        const actions = el('td', { 'data-label': 'Actions' });
        if (s.admin) {
          const label = (q.paused ? 'Resume ' : 'Pause ') + q.queue;
          actions.append(el('button', {
            type: 'button', class: 'pause', 'aria-label': label,
            onclick: () => setPaused(gen, q.queue, !q.paused, load),
          }, q.paused ? 'Resume' : 'Pause'));
          actions.append(' ', el('button', {
            type: 'button', class: 'limit', 'aria-label': 'Limit ' + q.queue,
            onclick: () => {
              limitQueue.value = q.queue;
              limitValue.value = q.maxRunning === null ? '' : String(q.maxRunning);
              limitValue.focus();
            },
          }, 'Limit'));
        }
        return el('tr', { 'data-queue': q.queue },
          el('th', { scope: 'row', 'data-label': 'Queue' },
            el('a', { href: '#/jobs?queue=' + encodeURIComponent(q.queue) }, q.queue)),
          // The depth is keyed by status name, as everywhere in the API.
          el('td', { class: 'num', 'data-label': 'Pending' }, String(q.depth.PENDING)),
          el('td', { class: 'num', 'data-label': 'Queued' }, String(q.depth.QUEUED)),
          el('td', { class: 'num', 'data-label': 'Running / max' },
            q.depth.RUNNING + ' / ' + (q.maxRunning === null ? '∞' : q.maxRunning)),
          el('td', { class: 'num', 'data-label': 'Oldest queued' }, age(q.oldestQueuedAgeMs)),
          el('td', { 'data-label': 'State' }, q.paused ? 'paused' : 'active'),
          actions);
      });
      if (!rows.length) rows.push(el('tr', {}, el('td', { colspan: 7 }, 'No queues with open jobs.')));
      // A refresh keeps the keyboard focus on the same queue's button.
      const row = document.activeElement && body.contains(document.activeElement)
        ? document.activeElement.closest('tr') : null;
      const focused = row ? row.getAttribute('data-queue') : null;
      replace(body, rows);
      if (focused !== null) {
        const again = Array.from(body.querySelectorAll('tr'))
          .find((tr) => tr.getAttribute('data-queue') === focused);
        const button = again && again.querySelector('button');
        if (button) button.focus();
      }
      if (streaming) {
        // Live: a change re-reads at once; this slow refresh only ages "Oldest queued".
        schedule(gen, load, dirty ? COALESCE_MS : LIVE_REFRESH_MS);
      } else if (failed) {
        mode.textContent = 'Refreshes every few seconds (the live stream is unavailable).';
        schedule(gen, load, LIST_POLL_MS);
      } else {
        follow();
      }
    };
    // One stream of every queue: any job event or queue change re-reads the table.
    let streaming = false;
    let failed = false;
    const follow = () => {
      streaming = true;
      const s = stream('coordinator/queues/*/events', {},
        () => { mode.textContent = 'Live: changes arrive over an event stream.'; },
        () => { dirty = true; schedule(gen, load, COALESCE_MS); });
      live = s.ctl;
      s.done.then((how) => {
        if (gen !== generation || how === 'aborted') return;
        streaming = false;
        failed = how === 'failed';
        load();
      });
    };
    await load();
  }

  async function setPaused(gen, queue, paused, reload) {
    await patchQueue(gen, queue, { paused }, (paused ? 'Paused ' : 'Resumed ') + queue + '.',
      reload);
  }

  /** `input` is the number field: empty removes the limit, anything it cannot read as
   *  a number (its `badInput`: its value is then '' too) is refused here rather than
   *  taken as "no limit". */
  async function setLimit(gen, queue, input, reload) {
    const text = input.value.trim();
    const n = Number(text);
    if (input.validity.badInput || (text !== '' && !(Number.isInteger(n) && n >= 1))) {
      notice('Max running is a whole number from 1 to 1000000, or empty for no limit.', true);
      return;
    }
    const maxRunning = text === '' ? null : n;
    await patchQueue(gen, queue, { maxRunning }, maxRunning === null
      ? 'Removed the limit of ' + queue + '.'
      : 'Limited ' + queue + ' to ' + maxRunning + ' running.', reload);
  }

  async function patchQueue(gen, queue, patch, done, reload) {
    const asked = key();
    const r = await api('PATCH', 'coordinator/queues/' + encodeURIComponent(queue), patch);
    if (r.status === 403) {
      // Only for the key that was refused: another may have been pasted meanwhile.
      if (key() === asked) scopes = Object.assign({}, scopes, { admin: false });
      notice('Your key lacks admin: ' + problem(r), true);
    } else if (!r.ok) {
      notice(problem(r), true);
    } else {
      notice(done);
    }
    if (gen === generation) reload();
  }

  // ---- Jobs ----------------------------------------------------------------------

  function jobsHash(params) {
    const q = new URLSearchParams();
    for (const [k, v] of params) if (v) q.append(k, v);
    const s = q.toString();
    return '#/jobs' + (s ? '?' + s : '');
  }

  async function jobsView(gen, params) {
    const field = (name, label, input) =>
      el('label', { for: 'f-' + name }, label, input);
    const queue = el('input', { id: 'f-queue', name: 'queue', value: params.get('queue') || '', size: 14 });
    const kind = el('input', { id: 'f-kind', name: 'kind', value: params.get('kind') || '', size: 14 });
    const status = el('select', { id: 'f-status', name: 'status' },
      el('option', { value: '' }, 'any'),
      STATUSES.map((s) => el('option', { value: s, selected: params.get('status') === s }, s)));
    const limit = el('select', { id: 'f-limit', name: 'limit' },
      ['25', '50', '100', '200'].map((n) =>
        el('option', { value: n, selected: (params.get('limit') || '50') === n }, n)));
    const form = el('form', {
      class: 'filters', role: 'search', 'aria-label': 'Filter jobs',
      onsubmit: (ev) => {
        ev.preventDefault();
        window.location.hash = jobsHash([['queue', queue.value.trim()], ['status', status.value],
          ['kind', kind.value.trim()], ['limit', limit.value === '50' ? '' : limit.value]]);
      },
    },
    field('queue', 'Queue', queue), field('status', 'Status', status),
    field('kind', 'Kind', kind), field('limit', 'Per page', limit),
    el('button', { type: 'submit' }, 'Apply'),
    el('a', { href: '#/jobs' }, 'Clear'));

    const body = el('tbody');
    const table = el('table', { id: 'jobs-table' },
      el('thead', {}, el('tr', {},
        el('th', { scope: 'col' }, 'Job'),
        el('th', { scope: 'col' }, 'Status'),
        el('th', { scope: 'col' }, 'Kind'),
        el('th', { scope: 'col' }, 'Queue'),
        el('th', { scope: 'col', class: 'num' }, 'Progress'),
        el('th', { scope: 'col' }, 'Message'),
        el('th', { scope: 'col' }, 'Created'),
        el('th', { scope: 'col' }, 'Updated'))),
      body);
    const state = el('p', { class: 'muted', role: 'status' });
    const pager = el('div', { class: 'pager' });
    replace(view(), el('h2', {}, 'Jobs'), form, state, table, pager);

    const query = new URLSearchParams();
    for (const k of ['queue', 'status', 'kind', 'limit', 'cursor']) {
      if (params.get(k)) query.set(k, params.get(k));
    }
    const firstPage = !params.get('cursor');

    const load = async () => {
      const t0 = performance.now();
      const r = await api('GET', 'coordinator/jobs' + (query.toString() ? '?' + query : ''));
      if (gen !== generation) return;
      if (!r.ok) {
        replace(state, el('span', { class: 'error' }, problem(r)));
        return schedule(gen, load, LIST_POLL_MS * 2);
      }
      const items = r.data.items || [];
      // Someone tabbing through the table keeps their place: skip this refresh.
      if (!(document.activeElement && body.contains(document.activeElement))) {
        replace(body, items.length ? items.map(jobRow)
          : el('tr', {}, el('td', { colspan: 8 }, 'No jobs match.')));
      }
      replace(state, items.length + ' job' + (items.length === 1 ? '' : 's') + ' on this page' +
        (firstPage ? ', newest first; refreshes every few seconds' : '') +
        ' (' + Math.round(performance.now() - t0) + ' ms).');
      const links = [];
      if (!firstPage) {
        const first = new URLSearchParams(params);
        first.delete('cursor');
        links.push(el('a', { href: jobsHash(first) }, 'First page'));
      }
      if (r.data.nextCursor) {
        const next = new URLSearchParams(params);
        next.set('cursor', r.data.nextCursor);
        links.push(el('a', { href: jobsHash(next), id: 'next-page' }, 'Next page'));
      }
      replace(pager, links);
      if (firstPage) schedule(gen, load, LIST_POLL_MS);
    };
    await load();
  }

  function jobRow(j) {
    return el('tr', { 'data-id': j.id },
      el('th', { scope: 'row', 'data-label': 'Job' },
        el('a', { href: '#/job/' + encodeURIComponent(j.id), class: 'id', title: j.id }, j.id.slice(-12))),
      el('td', { 'data-label': 'Status' }, statusBadge(j.status)),
      el('td', { 'data-label': 'Kind' }, j.kind),
      el('td', { 'data-label': 'Queue' }, j.queue),
      el('td', { class: 'num', 'data-label': 'Progress' }, j.progress + '%'),
      el('td', { class: 'msg', 'data-label': 'Message' }, j.message === null ? '' : j.message),
      el('td', { 'data-label': 'Created' }, time(j.createdAt)),
      el('td', { 'data-label': 'Updated' }, time(j.updatedAt)));
  }

  // ---- Job -----------------------------------------------------------------------

  const FIELDS = [
    ['kind', 'Kind'], ['queue', 'Queue'], ['priority', 'Priority'], ['message', 'Message'],
    ['attempts', 'Attempts'], ['maxAttempts', 'Max attempts'], ['runAt', 'Run at'],
    ['leaseExpiresAt', 'Lease expires'], ['createdAt', 'Created'], ['updatedAt', 'Updated'],
    ['startedAt', 'Started'], ['finishedAt', 'Finished'],
  ];
  const TIMES = ['runAt', 'leaseExpiresAt', 'createdAt', 'updatedAt', 'startedAt', 'finishedAt'];

  async function jobView(gen, id) {
    const title = el('h2', {}, 'Job ', el('span', { class: 'id' }, id));
    const badge = el('span', { id: 'job-status' });
    const bar = el('progress', { id: 'job-progress', max: 100, value: 0, 'aria-label': 'Progress' });
    const pct = el('span', { id: 'job-progress-text' }, '0%');
    const cancel = el('button', { type: 'button', class: 'danger', id: 'job-cancel', hidden: true },
      'Cancel job');
    const retry = el('button', { type: 'button', id: 'job-retry', hidden: true }, 'Retry job');
    const dl = el('dl', { class: 'fields', id: 'job-fields' });
    const blocks = {
      payload: el('div', { id: 'job-payload' }), result: el('div', { id: 'job-result' }),
      error: el('div', { id: 'job-error' }), gateResults: el('div', { id: 'job-gates' }),
    };
    const timeline = el('ol', { class: 'timeline', id: 'job-events' });
    const state = el('p', { class: 'muted', role: 'status' });
    const mode = el('p', { class: 'muted', id: 'job-live' }, 'Loading…');
    replace(view(),
      el('p', {}, el('a', { href: '#/jobs' }, '← Jobs')),
      title,
      el('p', {}, 'Status: ', badge),
      el('div', { class: 'progress-row' }, bar, pct),
      el('div', { class: 'actions' }, cancel, retry),
      state,
      el('div', { class: 'grid' },
        el('section', { 'aria-labelledby': 'h-fields' }, el('h3', { id: 'h-fields' }, 'Fields'), dl),
        el('section', { 'aria-labelledby': 'h-events' },
          el('h3', { id: 'h-events' }, 'Events'),
          mode,
          timeline)),
      el('h3', {}, 'Payload'), blocks.payload,
      el('h3', {}, 'Result'), blocks.result,
      el('h3', {}, 'Error'), blocks.error,
      el('h3', {}, 'Gate results'), blocks.gateResults);

    let last = '';
    const path = 'coordinator/jobs/' + encodeURIComponent(id);
    const act = (verb) => async () => {
      const asked = key();
      const r = await api('POST', path + '/' + verb, verb === 'cancel' ? {} : undefined);
      if (r.status === 403) {
        if (key() === asked) scopes = Object.assign({}, scopes, { update: false });
        notice('Your key lacks jobs:update: ' + problem(r), true);
      } else if (!r.ok) {
        notice(problem(r), true);
      } else {
        notice(verb === 'cancel' ? 'Job cancelled.' : 'Job queued again.');
      }
      last = '';
      if (gen === generation) load();
    };
    cancel.addEventListener('click', act('cancel'));
    retry.addEventListener('click', act('retry'));

    let dirty = false; // a stream event arrived while a read was under way
    const load = async () => {
      dirty = false;
      const [r, s] = await Promise.all([api('GET', path), probeScopes()]);
      if (gen !== generation) return;
      if (!r.ok) {
        replace(state, el('span', { class: 'error' }, problem(r)));
        return schedule(gen, load, JOB_POLL_MS * 2);
      }
      const j = r.data;
      const text = JSON.stringify(j);
      replace(state, 'Updated ' + new Date().toLocaleTimeString() + '.');
      if (text !== last) {
        last = text;
        replace(badge, statusBadge(j.status));
        bar.value = j.progress;
        bar.textContent = j.progress + '%';
        pct.textContent = j.progress + '%';
        cancel.hidden = !(s.update && OPEN_STATUSES.includes(j.status));
        retry.hidden = !(s.update && (j.status === 'FAILED' || j.status === 'CANCELLED'));
        replace(dl, FIELDS.map(([k, label]) => [
          el('dt', {}, label),
          el('dd', { 'data-field': k }, TIMES.includes(k) ? time(j[k])
            : j[k] === null || j[k] === undefined ? '—' : String(j[k])),
        ]));
        replace(blocks.payload, json(j.payload));
        replace(blocks.result, json(j.result));
        replace(blocks.error, j.error === null ? el('p', { class: 'muted' }, 'none') : el('pre', {}, j.error));
        replace(blocks.gateResults, json(j.gateResults));
        const events = (j.events || []).map((e) => el('li', { 'data-type': e.type },
          el('span', { class: 'etype' }, '#' + e.seq + ' ' + e.type), ' ', time(e.createdAt),
          el('pre', {}, JSON.stringify(e.data))));
        if (j.eventsTruncated) events.unshift(el('li', { class: 'muted' }, 'Older events left out.'));
        replace(timeline, events);
      }
      if (!OPEN_STATUSES.includes(j.status)) {
        mode.textContent = 'Finished: this job changes no more (unless retried).';
        return;
      }
      if (streaming) {
        if (dirty) schedule(gen, load, COALESCE_MS);
        return;
      }
      if (failed) {
        mode.textContent = 'Polled every 1.5 s (the live stream is unavailable).';
        return schedule(gen, load, JOB_POLL_MS);
      }
      const seqs = (j.events || []).map((e) => e.seq);
      follow(seqs.length ? Math.max(...seqs) : 0);
    };
    // The job's event stream, from the last event shown: each event re-reads the job.
    let streaming = false;
    let failed = false;
    const follow = (after) => {
      streaming = true;
      const s = stream(path + '/events', { 'Last-Event-ID': String(after) },
        () => { mode.textContent = 'Live: events arrive over an event stream.'; },
        () => { dirty = true; schedule(gen, load, COALESCE_MS); });
      live = s.ctl;
      s.done.then((how) => {
        if (gen !== generation || how === 'aborted') return;
        streaming = false;
        failed = how === 'failed';
        load(); // the final state; a job that goes on is followed again (or polled)
      });
    };
    await load();
  }

  // ---- Health --------------------------------------------------------------------

  async function healthView(gen) {
    const out = el('div');
    const auth = el('div');
    replace(view(), el('h2', {}, 'Health'), out, el('h3', {}, 'Authentication outcomes'), auth);
    const load = async () => {
      const [r, m] = await Promise.all([api('GET', 'coordinator/health'), metricsText()]);
      if (gen !== generation) return;
      if (!r.ok) {
        replace(out, el('p', { class: 'error' }, problem(r)));
      } else {
        const h = r.data;
        const db = h.database || {};
        replace(out, el('dl', { class: 'fields', id: 'health-fields' },
          el('dt', {}, 'Status'), el('dd', {}, h.status),
          el('dt', {}, 'Version'), el('dd', {}, h.version),
          el('dt', {}, 'Database'), el('dd', {}, db.status + ' (' + db.backend + ')'),
          el('dt', {}, 'Database latency'), el('dd', {}, db.latencyMs + ' ms'),
          el('dt', {}, 'Pool'), el('dd', {}, db.poolConnections + ' connections, ' + db.poolIdle + ' idle'),
          el('dt', {}, 'Oldest queued'), el('dd', {},
            h.oldestQueuedAgeSecs === null ? '—' : Math.round(h.oldestQueuedAgeSecs) + ' s'),
          el('dt', {}, 'Generated'), el('dd', {}, time(h.generatedAt))));
      }
      replace(auth, authTable(m));
      schedule(gen, load, LIST_POLL_MS);
    };
    await load();
  }

  /** /metrics is an open route: the auth outcome counters come from there. With
   *  `--metrics-bind` it is served elsewhere and this port answers 401: asked again
   *  every few seconds, that would spend the address's budget of failed attempts
   *  (shared by everyone behind the same proxy), so after a refusal it is not asked
   *  again until the page is reloaded. */
  let metricsServedHere = true;
  async function metricsText() {
    if (!metricsServedHere) return '';
    try {
      const r = await fetch(new URL('metrics', ROOT), { credentials: 'omit', cache: 'no-store' });
      if (r.ok) return await r.text();
      if (r.status === 401 || r.status === 403 || r.status === 404) metricsServedHere = false;
      return '';
    } catch (_) {
      return '';
    }
  }

  function authTable(text) {
    const rows = [];
    const re = /^coordinator_auth_outcomes_total\{([^}]*)\}\s+(\S+)$/;
    for (const line of text.split('\n')) {
      const m = re.exec(line);
      if (!m) continue;
      const labels = {};
      for (const p of m[1].match(/\w+="(?:[^"\\]|\\.)*"/g) || []) {
        const i = p.indexOf('=');
        labels[p.slice(0, i)] = p.slice(i + 2, -1);
      }
      rows.push(el('tr', {},
        el('td', { 'data-label': 'Scheme' }, labels.scheme || ''),
        el('td', { 'data-label': 'Outcome' }, labels.outcome || ''),
        el('td', { 'data-label': 'Reason' }, labels.reason || ''),
        el('td', { class: 'num', 'data-label': 'Count' }, m[2])));
    }
    if (!rows.length) return el('p', { class: 'muted' }, 'No counters (or /metrics is served elsewhere).');
    return el('table', { id: 'auth-table' },
      el('thead', {}, el('tr', {},
        el('th', { scope: 'col' }, 'Scheme'), el('th', { scope: 'col' }, 'Outcome'),
        el('th', { scope: 'col' }, 'Reason'), el('th', { scope: 'col', class: 'num' }, 'Count'))),
      el('tbody', {}, rows));
  }

  // ---- key -----------------------------------------------------------------------

  function showKeyState() {
    document.getElementById('key-state').textContent = key() ? 'key set (this tab only)' : 'no key';
  }

  function init() {
    const input = document.getElementById('api-key');
    document.getElementById('key-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const v = input.value.trim();
      if (!v) return;
      window.sessionStorage.setItem(KEY, v);
      input.value = '';
      scopes = null;
      notice('');
      showKeyState();
      render();
    });
    document.getElementById('key-forget').addEventListener('click', () => {
      window.sessionStorage.removeItem(KEY);
      scopes = null;
      showKeyState();
      render();
    });
    window.addEventListener('hashchange', () => { notice(''); render(); });
    showKeyState();
    render();
  }

  init();
}());
