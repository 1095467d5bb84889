// Browser test of the /ui/ dashboard against a running `serve --dev` (scripts/ui-test.sh).
// playwright-core drives Debian's chromium; every step throws on failure.
//
// Environment: COORDINATOR_URL, COORDINATOR_CLIENT_API_KEY (all scopes), UI_TEST_RO_KEY
// (jobs:read + health:read only), UI_TEST_SHOTS (where screenshots go).
import assert from 'node:assert/strict';
import { mkdirSync, statSync } from 'node:fs';
import { chromium } from 'playwright-core';

const base = process.env.COORDINATOR_URL;
const adminKey = process.env.COORDINATOR_CLIENT_API_KEY;
const roKey = process.env.UI_TEST_RO_KEY;
const shots = process.env.UI_TEST_SHOTS;
for (const [k, v] of Object.entries({ base, adminKey, roKey, shots })) {
  assert.ok(v, `${k} is not set`);
}
mkdirSync(shots, { recursive: true });

const step = (s) => console.log(`ui-test: ${s}`);

async function call(method, path, body, auth) {
  const headers = auth ? { Authorization: `Bearer ${auth}` } : { 'X-API-Key': adminKey };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const r = await fetch(base + path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

const XSS = '<img src=x onerror=alert(1)>';

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run'],
});
const failures = [];
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  const dialogs = [];
  page.on('dialog', (d) => { dialogs.push(d.message()); d.dismiss().catch(() => {}); });
  page.on('pageerror', (e) => failures.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    // 4xx answers are expected (the scope probes); anything else (a CSP violation, an
    // exception) is a failure.
    if (m.type() === 'error' && !/^Failed to load resource: the server responded with a status of 4\d\d/.test(m.text())) {
      failures.push(`console error: ${m.text()}`);
    }
  });
  const streams = [];
  page.on('request', (r) => {
    if (r.url().includes('/events') && (r.headers().accept || '').includes('text/event-stream')) {
      streams.push(new URL(r.url()).pathname);
    }
  });
  const bodies = [];
  page.on('response', (r) => {
    if (new URL(r.url()).pathname.startsWith('/ui/')) {
      bodies.push(r.body().then((b) => b.length, () => 0));
    }
  });

  // The page alone: open, no data, strict headers.
  const first = await page.goto(`${base}/ui/`);
  assert.equal(first.status(), 200);
  const csp = first.headers()['content-security-policy'];
  assert.match(csp, /default-src 'self'/);
  assert.match(csp, /frame-ancestors 'none'/);
  await page.getByText('Paste an API key above').waitFor();
  await page.waitForLoadState('networkidle');
  const bytes = (await Promise.all(bodies)).reduce((a, b) => a + b, 0);
  step(`page weight on first load: ${bytes} bytes in ${bodies.length} responses (html+js+css bodies, uncompressed)`);
  step(`CSP: ${csp}`);

  // Paste the key.
  await page.fill('#api-key', adminKey);
  await page.click('#key-use');
  await page.locator('#key-state').filter({ hasText: 'key set' }).waitFor();
  assert.equal(await page.evaluate(() => document.cookie), '', 'no cookies');
  assert.equal(await page.evaluate(() => window.sessionStorage.getItem('coordinator.apiKey')), adminKey);

  // A job created through the API appears in the list (the first page refreshes itself).
  const job = await call('POST', '/coordinator/jobs', { kind: 'ui-build', queue: 'uiq' });
  await page.goto(`${base}/ui/#/jobs`);
  await page.locator(`#jobs-table tr[data-id="${job.id}"]`).waitFor({ timeout: 10000 });
  step('a job created through the API appears in the list');
  await page.screenshot({ path: `${shots}/jobs.png`, fullPage: true });

  // Open it; claim, progress and complete through the API; the page follows by itself.
  await page.click(`#jobs-table tr[data-id="${job.id}"] a`);
  await page.locator('#job-status').filter({ hasText: 'PENDING' }).waitFor();
  // Live: the page follows the job's event stream (it polls only when that fails), so
  // what follows arrives over the stream.
  await page.locator('#job-live').filter({ hasText: 'Live' }).waitFor({ timeout: 5000 });
  assert.ok(streams.includes(`/coordinator/jobs/${job.id}/events`), `job stream opened (${streams})`);
  await call('PATCH', `/coordinator/jobs/${job.id}/status`, { status: 'QUEUED' });
  const claimed = await call('POST', '/coordinator/queues/uiq/claim', { worker: 'w' });
  assert.equal(claimed.id, job.id);
  await page.locator('#job-status').filter({ hasText: 'RUNNING' }).waitFor({ timeout: 5000 });
  await call('PATCH', `/coordinator/jobs/${job.id}/progress`, { percent: 50, message: 'half way' },
    claimed.token);
  await page.waitForFunction(() => document.getElementById('job-progress').value === 50,
    null, { timeout: 5000 });
  await page.locator('#job-events li[data-type="progress"]').first().waitFor({ timeout: 5000 });
  step('progress bar at 50% and a progress event, without a reload');
  await page.screenshot({ path: `${shots}/job.png`, fullPage: true });
  assert.ok(await page.locator('#job-live').filter({ hasText: 'Live' }).isVisible(),
    'still live, not polling');
  await call('POST', `/coordinator/jobs/${job.id}/complete`, {}, claimed.token);
  await page.locator('#job-status').filter({ hasText: 'COMPLETED' }).waitFor({ timeout: 5000 });
  await page.locator('#job-live').filter({ hasText: 'Finished' }).waitFor({ timeout: 5000 });
  await page.waitForFunction(() => document.getElementById('job-progress').value === 100,
    null, { timeout: 5000 }).catch(() => {}); // completion need not set 100
  assert.ok(await page.locator('#job-cancel').isHidden(), 'no cancel button on a finished job');
  step('completion shows without a reload');

  // Without a stream (refused as at the stream bound: 429), the job page falls back to
  // polling and still follows the job.
  await page.route('**/coordinator/jobs/*/events', (r) => r.fulfill({
    status: 429, contentType: 'application/problem+json', headers: { 'Retry-After': '1' },
    body: JSON.stringify({ status: 429, title: 'Too Many Requests' }),
  }));
  const polled = await call('POST', '/coordinator/jobs', { kind: 'ui-polled', queue: 'uiq' });
  await page.goto(`${base}/ui/#/job/${polled.id}`);
  await page.locator('#job-live').filter({ hasText: 'Polled' }).waitFor({ timeout: 5000 });
  await call('PATCH', `/coordinator/jobs/${polled.id}/status`, { status: 'QUEUED' });
  await page.locator('#job-status').filter({ hasText: 'QUEUED' }).waitFor({ timeout: 5000 });
  await page.unroute('**/coordinator/jobs/*/events');
  step('without the stream the job page polls, and still follows the job');

  // Cancel from the UI, then retry it.
  const doomed = await call('POST', '/coordinator/jobs', { kind: 'ui-doomed', queue: 'uiq' });
  await page.goto(`${base}/ui/#/job/${doomed.id}`);
  await page.locator('#job-cancel').click({ timeout: 5000 });
  await page.locator('#job-status').filter({ hasText: 'CANCELLED' }).waitFor({ timeout: 5000 });
  const after = await call('GET', `/coordinator/jobs/${doomed.id}`);
  assert.equal(after.status, 'CANCELLED');
  step('cancelled from the UI');
  await page.locator('#job-retry').click({ timeout: 5000 });
  await page.locator('#job-status').filter({ hasText: 'QUEUED' }).waitFor({ timeout: 5000 });
  step('retried from the UI');

  // Caller-supplied text renders as text: kind, queue-free fields, payload, message.
  const evil = await call('POST', '/coordinator/jobs', {
    kind: `x${XSS}`.replace(/ /g, '_'), queue: 'uiq', payload: { note: XSS, html: `</pre>${XSS}` },
  });
  await call('PATCH', `/coordinator/jobs/${evil.id}/status`, { status: 'QUEUED', message: XSS });
  await page.goto(`${base}/ui/#/jobs`);
  const row = page.locator(`#jobs-table tr[data-id="${evil.id}"]`);
  await row.waitFor({ timeout: 10000 });
  assert.equal(await row.locator('td.msg').textContent(), XSS);
  await page.goto(`${base}/ui/#/job/${evil.id}`);
  await page.locator('#job-payload pre').filter({ hasText: 'onerror' }).waitFor();
  assert.equal(await page.locator('#view img').count(), 0, 'no <img> was created');
  assert.equal(await page.locator('[data-field="message"]').textContent(), XSS);
  await page.waitForTimeout(500);
  assert.deepEqual(dialogs, [], 'no dialog fired');
  step('markup in kind, message and payload renders as text; no dialog');

  // Queues and health, with an admin key: pause/resume buttons.
  await page.goto(`${base}/ui/#/queues`);
  const pause = page.locator('#queues-table tr[data-queue="uiq"] button.pause');
  await pause.waitFor({ timeout: 5000 });
  await pause.click();
  await page.locator('#queues-table tr[data-queue="uiq"] td').filter({ hasText: 'paused' })
    .waitFor({ timeout: 5000 });
  assert.equal((await call('GET', '/coordinator/queues')).queues.find((q) => q.queue === 'uiq').paused,
    true);
  // The depth cells show the API's figures (keyed by status name).
  const api = (await call('GET', '/coordinator/queues')).queues.find((q) => q.queue === 'uiq');
  const cells = await page.locator('#queues-table tr[data-queue="uiq"] td').allInnerTexts();
  const maxRunning = api.maxRunning === null ? '∞' : String(api.maxRunning);
  assert.deepEqual(cells.slice(0, 3),
    [String(api.depth.PENDING), String(api.depth.QUEUED), `${api.depth.RUNNING} / ${maxRunning}`],
    `queue depth cells ${JSON.stringify(cells)}`);
  await page.screenshot({ path: `${shots}/queues.png`, fullPage: true });
  await page.locator('#queues-table tr[data-queue="uiq"] button.pause').click();
  await page.locator('#queues-table tr[data-queue="uiq"] td').filter({ hasText: 'active' })
    .waitFor({ timeout: 5000 });
  step('pause and resume from the UI with an admin key');
  // Limit a queue: the row's Limit button fills the form under the table; empty removes
  // the limit again.
  const uiq = async () => (await call('GET', '/coordinator/queues')).queues
    .find((q) => q.queue === 'uiq');
  await page.locator('#queues-table tr[data-queue="uiq"] button.limit').click();
  assert.equal(await page.inputValue('#limit-queue'), 'uiq');
  await page.fill('#limit-value', '3');
  await page.click('#limit-set');
  await page.locator('#queues-table tr[data-queue="uiq"] td').filter({ hasText: '/ 3' })
    .waitFor({ timeout: 5000 });
  assert.equal((await uiq()).maxRunning, 3);
  await page.fill('#limit-value', '0');
  await page.click('#limit-set');
  assert.equal(await page.$eval('#limit-value', (e) => e.validity.valid), false,
    '0 is not a limit');
  assert.equal((await uiq()).maxRunning, 3, 'an invalid limit is not sent');
  await page.fill('#limit-value', '');
  await page.click('#limit-set');
  await page.locator('#queues-table tr[data-queue="uiq"] td').filter({ hasText: '/ ∞' })
    .waitFor({ timeout: 5000 });
  assert.equal((await uiq()).maxRunning, null);
  step('limit a queue from the UI and remove the limit');
  // Live: the queue stream of every queue; a change made through the API shows without a
  // reload (no poll is scheduled while the stream is open: the next timed re-read is 30 s
  // away).
  await page.locator('#queues-live').filter({ hasText: 'Live' }).waitFor({ timeout: 5000 });
  assert.ok(streams.includes('/coordinator/queues/*/events'), `queue stream opened (${streams})`);
  await call('PATCH', '/coordinator/queues/uiq', { paused: true });
  await page.locator('#queues-table tr[data-queue="uiq"] td').filter({ hasText: 'paused' })
    .waitFor({ timeout: 5000 });
  const fresh = await call('POST', '/coordinator/jobs', { kind: 'ui-live', queue: 'uilive' });
  await page.locator('#queues-table tr[data-queue="uilive"]').waitFor({ timeout: 5000 });
  await call('PATCH', '/coordinator/queues/uiq', { paused: false });
  await call('POST', `/coordinator/jobs/${fresh.id}/cancel`, {});
  step('the queues table follows changes made through the API live');

  // A malformed % escape in the address: the page says it cannot read it, and no
  // stopped view is left on screen claiming to be live.
  await page.locator('#queues-live').filter({ hasText: 'Live' }).waitFor({ timeout: 5000 });
  await page.evaluate(() => { window.location.hash = '#/job/%E0%A4%A'; });
  await page.locator('#missing').filter({ hasText: 'could not be read' }).waitFor({ timeout: 5000 });
  assert.equal(await page.locator('#view h2').textContent(), 'Page not found');
  assert.equal(await page.locator('#queues-live').count(), 0, 'no stale "Live" queues table');
  step('a malformed % escape in the address shows "Page not found", not a stale live view');

  // #/job/<text> that is no job id: the text is not made the heading, only quoted (as
  // text) in the message, and the server is not asked for it.
  const lure = 'Your account is locked. Call <b>+1 555 0100</b> now';
  let asked = 0;
  page.on('request', (r) => { if (r.url().includes('/coordinator/jobs/Your')) asked += 1; });
  await page.evaluate((h) => { window.location.hash = h; }, `#/job/${encodeURIComponent(lure)}`);
  await page.locator('#missing').waitFor({ timeout: 5000 });
  assert.equal(await page.locator('#view h2').textContent(), 'Not a job id');
  assert.equal(await page.locator('#missing').textContent(),
    `This address names no job (job ids are UUIDs): “${lure}”.`);
  assert.equal(await page.locator('#view b').count(), 0, 'the text is not markup');
  assert.equal(asked, 0, 'no request for a non-id');
  step('#/job/<not an id> shows "Not a job id", the text only quoted in the message');

  await page.goto(`${base}/ui/#/health`);
  await page.locator('#health-fields').waitFor({ timeout: 5000 });
  await page.locator('#auth-table').waitFor({ timeout: 5000 });
  await page.screenshot({ path: `${shots}/health.png`, fullPage: true });
  step('health view');

  // With --metrics-bind, /metrics on this port is refused (401): the page must not ask
  // again every few seconds, spending the address's budget of failed attempts.
  let metricsAsked = 0;
  await page.route('**/metrics', (route) => {
    metricsAsked += 1;
    return route.fulfill({ status: 401, contentType: 'application/problem+json', body: '{}' });
  });
  await page.reload();
  await page.locator('#health-fields').waitFor({ timeout: 5000 });
  await page.waitForTimeout(7000); // two more refreshes of the health view
  assert.equal(metricsAsked, 1, `a refused /metrics is asked once per page load (${metricsAsked})`);
  await page.unroute('**/metrics');
  step('a refused /metrics is not asked for again');

  // Keyboard: the nav links and the key form are reachable with Tab.
  await page.goto(`${base}/ui/#/jobs`);
  await page.locator('#jobs-table tr[data-id]').first().waitFor();
  await page.reload();
  await page.locator('#jobs-table tr[data-id]').first().waitFor();
  const seen = [];
  for (let i = 0; i < 10; i += 1) {
    await page.keyboard.press('Tab');
    seen.push(await page.evaluate(() => document.activeElement && document.activeElement.id));
  }
  for (const id of ['nav-queues', 'nav-jobs', 'nav-health', 'api-key', 'key-use']) {
    assert.ok(seen.includes(id), `Tab reaches #${id} (${seen})`);
  }

  // Phone width.
  const phone = await browser.newContext({ viewport: { width: 390, height: 844 }, isMobile: true });
  const small = await phone.newPage();
  await small.goto(`${base}/ui/`);
  await small.fill('#api-key', adminKey);
  await small.click('#key-use');
  await small.locator('#jobs-table tr[data-id]').first().waitFor({ timeout: 10000 });
  const overflow = await small.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `no horizontal scrolling at phone width (${overflow}px too wide)`);
  await small.screenshot({ path: `${shots}/jobs-phone.png`, fullPage: true });
  await phone.close();
  step('phone width: no horizontal scrolling');

  // The system's dark mode darkens the page (and its form controls).
  const dark = await browser.newContext({ viewport: { width: 1280, height: 900 }, colorScheme: 'dark' });
  const darkPage = await dark.newPage();
  darkPage.on('pageerror', (e) => failures.push(`page error: ${e.message}`));
  await darkPage.goto(`${base}/ui/`);
  await darkPage.fill('#api-key', adminKey);
  await darkPage.click('#key-use');
  await darkPage.goto(`${base}/ui/#/queues`);
  await darkPage.locator('#queues-table tr[data-queue="uiq"] button.limit').waitFor({ timeout: 5000 });
  const [bg, fg] = await darkPage.evaluate(() => {
    const st = getComputedStyle(document.documentElement);
    return [st.backgroundColor, st.color];
  });
  const lum = (c) => c.match(/\d+/g).slice(0, 3).map(Number).reduce((a, b) => a + b, 0);
  assert.ok(lum(bg) < 100 && lum(fg) > 500, `dark page: background ${bg}, text ${fg}`);
  await darkPage.screenshot({ path: `${shots}/queues-dark.png`, fullPage: true });
  await dark.close();
  step('dark mode follows the system');

  // A key without admin: no pause button (and no cancel button without jobs:update).
  const ro = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const roPage = await ro.newPage();
  await roPage.goto(`${base}/ui/`);
  await roPage.fill('#api-key', roKey);
  await roPage.click('#key-use');
  await roPage.goto(`${base}/ui/#/queues`);
  await roPage.locator('#queues-table tr[data-queue="uiq"]').waitFor({ timeout: 5000 });
  await roPage.getByText('Your key lacks admin').waitFor();
  assert.equal(await roPage.locator('#queues-table button').count(), 0, 'no pause button');
  assert.ok(await roPage.locator('#limit-form').isHidden(), 'no limit form');
  await roPage.screenshot({ path: `${shots}/queues-read-only.png`, fullPage: true });
  await roPage.goto(`${base}/ui/#/job/${evil.id}`);
  await roPage.locator('#job-status').filter({ hasText: 'QUEUED' }).waitFor({ timeout: 5000 });
  assert.ok(await roPage.locator('#job-cancel').isHidden(), 'no cancel button without jobs:update');
  await ro.close();
  step('a key without admin gets no pause button');

  // A scope probe still under way when its key is forgotten must not grant its answer to
  // the next key: the admin key's probe is held back until a read-only key has replaced
  // it; the queues page must then still offer no pause button.
  const swap = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const swapPage = await swap.newPage();
  swapPage.on('pageerror', (e) => failures.push(`page error: ${e.message}`));
  let heldBack;
  const held = new Promise((resolve) => { heldBack = resolve; });
  await swapPage.route('**/coordinator/queues/~', async (r) => {
    if (r.request().headers()['x-api-key'] !== adminKey) return r.continue();
    await new Promise((resolve) => setTimeout(resolve, 1500));
    await r.continue();
    heldBack();
  });
  const lateProbe = swapPage.waitForResponse((r) => r.url().endsWith('/coordinator/queues/~')
    && r.request().headers()['x-api-key'] === adminKey, { timeout: 10000 });
  await swapPage.goto(`${base}/ui/#/queues`);
  await swapPage.fill('#api-key', adminKey);
  await swapPage.click('#key-use');
  await swapPage.waitForTimeout(300);
  await swapPage.click('#key-forget');
  await swapPage.fill('#api-key', roKey);
  await swapPage.click('#key-use');
  await swapPage.getByText('Your key lacks admin').waitFor({ timeout: 5000 });
  await held;
  await lateProbe;
  await swapPage.waitForTimeout(300); // the late answer is read
  // Another visit re-reads the table with the scopes the page now holds.
  await swapPage.evaluate(() => { window.location.hash = '#/jobs'; });
  await swapPage.locator('#jobs-table').waitFor({ timeout: 5000 });
  await swapPage.evaluate(() => { window.location.hash = '#/queues'; });
  await swapPage.locator('#queues-table tr[data-queue="uiq"]').waitFor({ timeout: 5000 });
  const said = swapPage.locator('#view p.muted').filter({ hasText: 'Your key' });
  await said.waitFor({ timeout: 5000 });
  assert.match(await said.textContent(), /lacks admin/, 'the scopes of the previous key');
  assert.equal(await swapPage.locator('#queues-table button').count(), 0,
    'no pause button from the previous key\'s late scope probe');
  await swap.close();
  step('a late scope probe of a forgotten key does not carry over to the next key');

  // Time to first render of the jobs page with 10,000 more jobs in the database.
  for (let i = 0; i < 10; i += 1) {
    await call('POST', '/coordinator/jobs/batch', {
      jobs: Array.from({ length: 1000 }, (_, n) => ({ kind: 'bulk', queue: `bulk${n % 7}` })),
    });
  }
  const t0 = Date.now();
  await page.goto(`${base}/ui/#/jobs?limit=50`);
  await page.reload();
  await page.locator('#jobs-table tr[data-id]').first().waitFor();
  step(`jobs page with 10,000+ jobs: first rows rendered ${Date.now() - t0} ms after navigation`);

  assert.deepEqual(failures, [], 'no page or console errors');
  for (const f of ['jobs', 'job', 'queues', 'health', 'jobs-phone', 'queues-read-only']) {
    assert.ok(statSync(`${shots}/${f}.png`).size > 0, f);
  }
  step('passed');
} finally {
  await browser.close();
}
