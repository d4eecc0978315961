// The review UI driven the way an analyst uses it, in headless Chromium.
//
//   node tests/browser/review.mjs --url http://127.0.0.1:PORT --artifacts DIR
//
// Environment: CHROMIUM (the browser to drive, e.g. /usr/bin/chromium),
// REVIEW_ALICE_USER / REVIEW_ALICE_PASSWORD and REVIEW_BOB_USER /
// REVIEW_BOB_PASSWORD (two reviewers that exist). DIR must hold `seed.json`,
// written by tests/review_browser.rs: the seeded documents (id, title,
// source, top5) in the order the queue hands them out, and the id of the
// document whose title and text are script injections.
//
// Every step asserts what a person would see and throws with a message saying
// what was expected. On success the script writes DIR/decisions.json (what
// was decided, skipped and refused, for the Rust test to check against the
// table and the feedback topic) and the screenshots queue.png, document.png,
// markup.png and stats.png; on failure, failure.png and failure.html of the
// page at hand.

import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

function arg(name) {
  const i = process.argv.indexOf(name);
  if (i < 0 || i + 1 >= process.argv.length) {
    throw new Error(`missing ${name}; usage: node review.mjs --url URL --artifacts DIR`);
  }
  return process.argv[i + 1];
}

function env(name) {
  const v = process.env[name];
  if (!v) throw new Error(`environment variable ${name} is not set`);
  return v;
}

const BASE = arg('--url').replace(/\/$/, '');
const ARTIFACTS = arg('--artifacts');
const CHROMIUM = env('CHROMIUM');
const ALICE = { user: env('REVIEW_ALICE_USER'), password: env('REVIEW_ALICE_PASSWORD') };
const BOB = { user: env('REVIEW_BOB_USER'), password: env('REVIEW_BOB_PASSWORD') };
const SEED = JSON.parse(readFileSync(join(ARTIFACTS, 'seed.json'), 'utf8'));
const BY_ID = new Map(SEED.documents.map((d) => [d.id, d]));
/** The keys pressed on the first ten documents, in order. */
const KEYS = ['1', '2', '3', '4', '5', '1', 'r', '2', '3', '1'];
const FILTERS = 'order=uncertainty';

const record = { decisions: [], skipped: [], refused: [], untouched: [], identities: [] };
const timings = [];
let current = null; // the page a failure is reported from

function ensure(cond, message) {
  if (!cond) throw new Error(message);
}

function docIdOf(url) {
  const u = new URL(url);
  const m = u.pathname.match(/^\/doc\/([^/]+)$/);
  return m ? decodeURIComponent(m[1]) : null;
}

async function step(name, fn) {
  const t0 = Date.now();
  process.stdout.write(`step: ${name} ... `);
  await fn();
  const ms = Date.now() - t0;
  timings.push({ step: name, ms });
  process.stdout.write(`ok (${ms} ms)\n`);
}

/** Waits for the page to show a document other than `previous`. */
async function waitForDoc(page, previous) {
  await page.waitForURL((u) => {
    const id = docIdOf(u.href);
    return id !== null && id !== previous;
  }, { waitUntil: 'load' });
  return docIdOf(page.url());
}

/** The request that was answered with a redirect to reach `response`, if any. */
function firstStatus(response) {
  let req = response.request();
  while (req.redirectedFrom()) req = req.redirectedFrom();
  return req;
}

async function login(page, who, next) {
  await page.goto(`${BASE}/login${next ? `?next=${encodeURIComponent(next)}` : ''}`);
  await page.fill('form#login input[name=username]', who.user);
  await page.fill('form#login input[name=password]', who.password);
  const [response] = await Promise.all([
    page.waitForNavigation(),
    page.click('form#login button[type=submit]'),
  ]);
  return response;
}

/** What the document page shows of its top 5, checked against the seed. */
async function readDocument(page, id) {
  const seed = BY_ID.get(id);
  ensure(seed, `the UI handed out /doc/${id}, which is not a seeded document`);
  await page.waitForSelector('h1#title');
  const shown = await page.$$eval('ol#top5 li.label', (lis) => lis.map((li) => ({
    label: li.getAttribute('data-label'),
    text: li.textContent,
    bar: (() => {
      const bar = li.querySelector('span.bar');
      return bar ? bar.style.width : null;
    })(),
  })));
  ensure(shown.length === 5, `/doc/${id}: expected 5 li.label in ol#top5, found ${shown.length}`);
  shown.forEach((s, i) => {
    const want = seed.top5[i];
    ensure(s.label === want.label,
      `/doc/${id}: top 5 entry ${i + 1} has data-label ${JSON.stringify(s.label)}, expected ${JSON.stringify(want.label)}`);
    ensure(s.bar !== null, `/doc/${id}: top 5 entry ${i + 1} has no span.bar`);
    ensure(/%$/.test(s.bar) && Math.abs(parseFloat(s.bar) - want.score * 100) < 1,
      `/doc/${id}: the bar of ${want.label} is ${JSON.stringify(s.bar)} wide, expected ${(want.score * 100).toFixed(1)}%`);
  });
  const title = await page.textContent('h1#title');
  ensure(title.includes(seed.title),
    `/doc/${id}: h1#title is ${JSON.stringify(title)}, expected it to contain ${JSON.stringify(seed.title)}`);
  const source = await page.textContent('#source');
  ensure(source.includes(seed.source), `/doc/${id}: #source is ${JSON.stringify(source)}, expected ${seed.source}`);
  for (const sel of ['a#url', '#fetched-at', '#model-version', '#text', 'form#reject', 'form#choose', 'form#skip']) {
    ensure(await page.$(sel), `/doc/${id}: ${sel} is missing`);
  }
  // Each of the 5 with its category's name and description, and the words
  // that weighed for it, highlighted in the text in its colour.
  const meaning = await page.$$eval('ol#top5 li.label', (lis) => lis.map((li) => ({
    name: li.querySelector('.cat-name')?.textContent ?? null,
    description: li.querySelector('.description')?.textContent ?? null,
    why: [...li.querySelectorAll('.why mark')].map((m) => m.textContent.trim()),
  })));
  meaning.forEach((m, i) => {
    const label = seed.top5[i].label;
    const c = SEED.categories[label];
    if (c) {
      ensure(m.name === c.name, `/doc/${id}: ${label} is named ${JSON.stringify(m.name)}, expected ${JSON.stringify(c.name)}`);
      if (c.description) ensure(m.description && m.description.includes(c.description), `/doc/${id}: ${label} shows no description ${JSON.stringify(c.description)}`);
    } else {
      ensure(m.name === null, `/doc/${id}: ${label} is outside the vocabulary but shows a name ${m.name}`);
    }
    const want = (seed.why[i] ?? []);
    ensure(JSON.stringify(m.why) === JSON.stringify(want), `/doc/${id}: ${label} shows the words ${JSON.stringify(m.why)}, expected ${JSON.stringify(want)}`);
  });
  const marked = await page.$$eval('#text mark.why', (ms) => ms.map((m) => [m.textContent, m.className]));
  seed.why.forEach((words, i) => {
    for (const w of words) {
      ensure(marked.some(([t, cls]) => t.toLowerCase() === w && cls.includes('why-')),
        `/doc/${id}: "${w}" (label ${i + 1}) is not highlighted in #text: ${JSON.stringify(marked)}`);
    }
  });
  if (!seed.why.length) ensure(marked.length === 0, `/doc/${id}: highlights without words: ${JSON.stringify(marked)}`);
  const accepts = await page.$$eval('form.accept', (fs) => fs.map((f) => f.getAttribute('data-key')));
  ensure(JSON.stringify(accepts) === JSON.stringify(['1', '2', '3', '4', '5']),
    `/doc/${id}: expected five form.accept with data-key 1..5, found ${JSON.stringify(accepts)}`);
  return seed;
}

async function main() {
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox'],
  });
  try {
    await run(browser);
  } catch (e) {
    if (current && !current.isClosed()) {
      await current.screenshot({ path: join(ARTIFACTS, 'failure.png'), fullPage: true }).catch(() => {});
      const html = await current.content().catch(() => '');
      writeFileSync(join(ARTIFACTS, 'failure.html'), html);
    }
    throw e;
  } finally {
    await browser.close();
  }
}

async function run(browser) {
  const viewport = { width: 1280, height: 900 };
  const anon = await browser.newContext({ viewport });
  const alice = await browser.newContext({ viewport });
  const bob = await browser.newContext({ viewport });
  for (const ctx of [anon, alice, bob]) ctx.setDefaultTimeout(5000);
  const page = await alice.newPage();
  current = page;
  const dialogs = [];
  page.on('dialog', async (d) => { dialogs.push(d.message()); await d.dismiss(); });
  const order = SEED.documents.map((d) => d.id);
  const xss = SEED.xss_id;

  await step('every page redirects to /login without a session', async () => {
    const anonPage = await anon.newPage();
    current = anonPage;
    for (const path of ['/queue', `/doc/${order[0]}`, '/stats', '/next', '/labels?q=a', `/queue?source=${SEED.documents[0].source}&order=newest`]) {
      const res = await anon.request.get(`${BASE}${path}`, { maxRedirects: 0 });
      ensure(res.status() === 303, `GET ${path} without a session answered ${res.status()}, expected 303`);
      const location = new URL(res.headers().location ?? '', BASE);
      ensure(location.pathname === '/login' && location.searchParams.get('next') === path,
        `GET ${path} without a session redirected to ${res.headers().location}, expected /login?next=${path}`);
      await anonPage.goto(`${BASE}${path}`);
      ensure(new URL(anonPage.url()).pathname === '/login', `the browser ended on ${anonPage.url()} for ${path}, expected /login`);
      ensure(await anonPage.$('form#login'), `the login page reached from ${path} has no form#login`);
    }
    const csrf = await anonPage.getAttribute('form#login input[name=csrf]', 'value');
    ensure(csrf && csrf.length >= 16, `the login form's csrf field is ${JSON.stringify(csrf)}, expected a random token`);
    const cookie = (await anon.cookies()).find((c) => c.name === 'sift_login_csrf');
    ensure(cookie && cookie.httpOnly && cookie.sameSite === 'Strict',
      `cookie sift_login_csrf should be HttpOnly and SameSite=Strict, got ${JSON.stringify(cookie)}`);
    const health = await anon.request.get(`${BASE}/healthz`);
    ensure(health.status() === 200 && (await health.text()).trim() === 'ok', `/healthz answered ${health.status()}`);
    const metrics = await anon.request.get(`${BASE}/metrics`);
    ensure(metrics.status() === 200, `/metrics answered ${metrics.status()} without a session, expected 200`);
    await anonPage.close();
    current = page;
  });

  await step('a login without the CSRF token is refused', async () => {
    const res = await anon.request.post(`${BASE}/login`, {
      form: { username: ALICE.user, password: ALICE.password },
      maxRedirects: 0,
    });
    ensure(res.status() === 403, `POST /login without csrf answered ${res.status()}, expected 403`);
    ensure(!(await anon.cookies()).some((c) => c.name === 'sift_session'), 'a login without csrf set sift_session');
  });

  await step('log in as alice (a wrong password first)', async () => {
    const bad = await login(page, { user: ALICE.user, password: `${ALICE.password}-wrong` }, '/queue');
    ensure(bad.status() === 401, `a wrong password answered ${bad.status()}, expected 401`);
    const error = await page.textContent('#error');
    ensure(/Invalid user name or password/.test(error), `#error says ${JSON.stringify(error)} after a wrong password`);
    ensure(!(await alice.cookies()).some((c) => c.name === 'sift_session'), 'a wrong password set sift_session');
    const good = await login(page, ALICE, '/queue');
    ensure(firstStatus(good).redirectedTo() !== null, 'a good login did not redirect');
    ensure(new URL(page.url()).pathname === '/queue', `a good login with next=/queue ended on ${page.url()}`);
    const session = (await alice.cookies()).find((c) => c.name === 'sift_session');
    ensure(session && session.httpOnly && session.sameSite === 'Strict' && session.path === '/',
      `cookie sift_session should be HttpOnly, SameSite=Strict, Path=/; got ${JSON.stringify(session)}`);
  });

  await step('the queue lists, filters and orders the documents', async () => {
    await page.goto(`${BASE}/queue`);
    const ids = await page.$$eval('table#queue tr.doc a.open', (as) => as.map((a) => a.getAttribute('href')));
    ensure(ids.length > 0, 'table#queue has no tr.doc with an a.open');
    const first = decodeURIComponent(ids[0].replace(/^\/doc\//, '').replace(/\?.*$/, ''));
    ensure(first === order[0],
      `the queue's first row opens ${ids[0]}, expected /doc/${order[0]} (the lowest top-1 score)`);
    const count = parseInt((await page.textContent('#count')).replace(/[^0-9]/g, ''), 10);
    ensure(count === SEED.documents.length, `#count says ${count}, expected ${SEED.documents.length}`);
    for (const sel of ['a#nav-queue', 'a#nav-stats', 'form#logout', 'a#start']) {
      ensure(await page.$(sel), `/queue has no ${sel}`);
    }
    ensure(!(await page.$('#empty')), '/queue shows #empty with documents waiting');
    ensure(await page.evaluate(() => window.__pwned) === undefined, '/queue ran script from a document title');
    await page.screenshot({ path: join(ARTIFACTS, 'queue.png'), fullPage: false });

    const source = SEED.documents[0].source;
    const ofSource = SEED.documents.filter((d) => d.source === source).length;
    await page.goto(`${BASE}/queue?source=${encodeURIComponent(source)}&order=newest`);
    const rows = await page.$$('table#queue tr.doc');
    ensure(rows.length === ofSource, `/queue?source=${source} shows ${rows.length} rows, expected ${ofSource}`);
    for (const row of rows) {
      const text = await row.textContent();
      ensure(text.includes(source), `/queue?source=${source} shows a row of another source: ${text.trim()}`);
    }
    const start = await page.getAttribute('a#start', 'href');
    ensure(start.startsWith('/next?') && start.includes(`source=${encodeURIComponent(source)}`),
      `a#start is ${start}, expected /next with the same filters`);

    // The filters travel from the queue through /next to the document page.
    const newest = SEED.documents.filter((d) => d.source === source)
      .reduce((a, b) => (b.fetched_at_ms > a.fetched_at_ms ? b : a));
    await Promise.all([page.waitForURL(/\/doc\//), page.click('a#start')]);
    const opened = new URL(page.url());
    ensure(docIdOf(page.url()) === newest.id,
      `a#start with source=${source}&order=newest opened ${page.url()}, expected the newest of ${source}: ${newest.id}`);
    ensure(opened.searchParams.get('source') === source && opened.searchParams.get('order') === 'newest',
      `the document page ${page.url()} lost the filters source=${source}&order=newest`);
    const hidden = await page.$eval('form#skip', (f) => Object.fromEntries(new FormData(f)));
    ensure(hidden.source === source && hidden.order === 'newest',
      `form#skip sends ${JSON.stringify(hidden)}, expected the filters source=${source}&order=newest`);

    const category = SEED.category_filter;
    const inCategory = SEED.documents.filter((d) => d.top5.some((s) => s.label === category)).length;
    await page.goto(`${BASE}/queue?category=${encodeURIComponent(category)}`);
    const shown = await page.$$('table#queue tr.doc');
    ensure(shown.length === inCategory, `/queue?category=${category} shows ${shown.length} rows, expected ${inCategory}`);

    await page.goto(`${BASE}/queue?source=no-such-source`);
    ensure(await page.$('#empty'), '/queue?source=no-such-source does not show #empty');
    ensure((await page.$$('table#queue tr.doc')).length === 0, '/queue?source=no-such-source lists documents');
    const next = await alice.request.get(`${BASE}/next?source=no-such-source`, { maxRedirects: 0 });
    const to = new URL(next.headers().location ?? '', BASE);
    ensure(next.status() === 303 && to.pathname === '/queue' && to.searchParams.get('empty') === '1'
      && to.searchParams.get('source') === 'no-such-source',
      `/next with nothing left answered ${next.status()} to ${next.headers().location}, expected /queue?source=no-such-source&empty=1`);
  });

  let id;
  await step('review 10 documents with the keyboard (1-5, r)', async () => {
    await page.goto(`${BASE}/queue?${FILTERS}`);
    await Promise.all([page.waitForURL(/\/doc\//), page.click('a#start')]);
    id = docIdOf(page.url());
    for (let i = 0; i < KEYS.length; i++) {
      ensure(id === order[i], `document ${i + 1} handed out is ${id}, expected ${order[i]} (queue order by uncertainty)`);
      const sent = await page.$$eval('form.accept input[name=order], form#reject input[name=order]', (is) => is.map((i) => i.value));
      ensure(sent.length === 6 && sent.every((o) => o === 'uncertainty'),
        `the decision forms on ${page.url()} carry order=${JSON.stringify(sent)}, expected the queue's order=uncertainty`);
      const seed = await readDocument(page, id);
      if (i === 0) await page.screenshot({ path: join(ARTIFACTS, 'document.png'), fullPage: false });
      const key = KEYS[i];
      await page.keyboard.press(key);
      const next = await waitForDoc(page, id);
      if (key === 'r') {
        record.decisions.push({ id, key, decision: 'reject', label: null, rejected: seed.top5.map((s) => s.label), reviewer: ALICE.user });
      } else {
        const label = seed.top5[Number(key) - 1].label;
        record.decisions.push({ id, key, decision: 'accept', label, rejected: [], reviewer: ALICE.user });
      }
      id = next;
    }
  });

  await step('choose a label through the search box (/)', async () => {
    const seed = await readDocument(page, id);
    ensure(id === order[KEYS.length], `the 11th document is ${id}, expected ${order[KEYS.length]}`);
    const own = new Set(seed.top5.map((s) => s.label));
    const label = SEED.choose_label;
    ensure(!own.has(label), 'the seed picked a choose label that is in the top 5');
    const labels = await alice.request.get(`${BASE}/labels?q=${encodeURIComponent(SEED.choose_query.toUpperCase())}`);
    ensure(labels.status() === 200, `/labels answered ${labels.status()}`);
    const found = await labels.json();
    ensure(Array.isArray(found) && found.length <= 20 && found.includes(label)
      && found.every((l) => l.toLowerCase().includes(SEED.choose_query.toLowerCase())),
      `/labels?q=${SEED.choose_query.toUpperCase()} answered ${JSON.stringify(found)}, expected at most 20 labels containing it, ${label} among them`);
    // Words of a category's description find it too, with its name.
    const described = await alice.request.get(`${BASE}/labels?detail=1&q=${encodeURIComponent(SEED.description_query)}`);
    const byWords = await described.json();
    ensure(described.status() === 200 && Array.isArray(byWords)
      && byWords.some((f) => f.label === SEED.description_label && f.name === SEED.categories[SEED.description_label].name),
      `/labels?detail=1&q=${SEED.description_query} answered ${JSON.stringify(byWords)}, expected ${SEED.description_label} with its name`);

    await page.keyboard.press('/');
    ensure(await page.evaluate(() => document.activeElement?.id) === 'label-search', '/ did not focus #label-search');
    ensure(await page.inputValue('#label-search') === '', '/ typed itself into #label-search');
    // Shortcut keys typed into the search box are text, not decisions.
    await page.keyboard.type('1r');
    await page.waitForTimeout(300);
    ensure(docIdOf(page.url()) === id, 'typing 1 into #label-search decided the document');
    ensure(await page.inputValue('#label-search') === '1r', 'keys typed into #label-search did not land there');
    await page.fill('#label-search', '');
    await page.keyboard.type(SEED.choose_query);

    const navigated = waitForDoc(page, id).then(() => true);
    if (await page.$('ul#label-results')) {
      const item = page.locator('ul#label-results li', { hasText: label }).filter({ hasText: new RegExp(`^\\s*${label.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}\\s*$`) });
      await item.first().click();
    } else {
      ensure(await page.getAttribute('#label-search', 'list') === 'labels', '#label-search has neither list="labels" nor ul#label-results');
      await page.waitForSelector(`datalist#labels option[value="${label}"]`, { state: 'attached' });
      await page.fill('#label-search', label);
    }
    const auto = await Promise.race([navigated, page.waitForTimeout(400).then(() => false)]);
    if (!auto) {
      const value = await page.$eval('form#choose', (f) => new FormData(f).get('label'));
      ensure(value === label, `form#choose would send label=${JSON.stringify(value)}, expected ${JSON.stringify(label)}`);
      const submit = await page.$('form#choose [type=submit]');
      if (submit) await submit.click(); else await page.$eval('form#choose', (f) => f.requestSubmit());
    }
    const next = await waitForDoc(page, id);
    record.decisions.push({ id, key: '/', decision: 'choose', label, rejected: [], reviewer: ALICE.user });
    id = next;
  });

  let bobs = [];
  await step('a document alice has open is not handed to bob', async () => {
    const held = id;
    ensure(held === order[KEYS.length + 1], `alice's 12th document is ${held}, expected ${order[KEYS.length + 1]}`);
    await readDocument(page, held);
    const bobPage = await bob.newPage();
    current = bobPage;
    const res = await login(bobPage, BOB, `/next?${FILTERS}`);
    ensure(res.ok(), `bob's login answered ${res.status()}`);
    let seen = docIdOf(bobPage.url());
    ensure(seen !== null, `bob's /next after login ended on ${bobPage.url()}`);
    for (let i = 0; i < 3; i++) {
      ensure(seen !== held, `bob's /next handed him ${held}, which alice has open`);
      bobs.push(seen);
      await bobPage.keyboard.press('n');
      seen = await waitForDoc(bobPage, seen);
    }
    ensure(seen !== held, `bob's /next handed him ${held}, which alice has open`);
    bobs.push(seen);
    const leased = await bobPage.goto(`${BASE}/doc/${held}`);
    ensure(leased.status() === 409, `bob opening alice's document answered ${leased.status()}, expected 409`);
    ensure(await bobPage.$('#leased'), 'bob opening alice\'s document shows no #leased');
    for (const b of bobs.slice(0, 3)) record.skipped.push(b);

    // Bob logs out: his session is gone.
    await bobPage.goto(`${BASE}/queue`);
    await Promise.all([bobPage.waitForURL(/\/login/), bobPage.click('form#logout [type=submit], form#logout button')]);
    const after = await bob.request.get(`${BASE}/queue`, { maxRedirects: 0 });
    ensure(after.status() === 303, `bob's /queue after logout answered ${after.status()}, expected 303 to /login`);
    await bobPage.close();
    current = page;

    // Alice skips the document she held: the next one is another.
    await page.keyboard.press('n');
    const next = await waitForDoc(page, held);
    record.skipped.push(held);
    id = next;
  });

  await step('a document with <script> and <img onerror> renders inert', async () => {
    const res = await page.goto(`${BASE}/doc/${encodeURIComponent(xss)}`);
    ensure(res.status() === 200, `/doc/${xss} answered ${res.status()}`);
    await page.waitForSelector('#text');
    await page.waitForTimeout(200);
    ensure(await page.evaluate(() => window.__pwned) === undefined,
      `the document's markup ran: window.__pwned = ${await page.evaluate(() => window.__pwned)}`);
    ensure(dialogs.length === 0, `the page opened dialogs: ${dialogs.join(', ')}`);
    const text = await page.textContent('#text');
    ensure(text.includes('<script>window.__pwned=1</script>'), `#text does not show the literal <script> tag: ${text}`);
    ensure(text.includes('<img src=x onerror="window.__pwned=2">'), `#text does not show the literal <img> tag: ${text}`);
    const title = await page.textContent('h1#title');
    ensure(title.includes('<script>') && title.includes('<img'), `h1#title does not show the literal tags: ${title}`);
    ensure(await page.$$eval('img[src="x"], #text script, h1#title script, #text img', (e) => e.length) === 0,
      'the document\'s tags became elements');
    const href = await page.getAttribute('a#url', 'href');
    ensure(href === BY_ID.get(xss).url, `a#url's href is ${JSON.stringify(href)}, expected the stored URL`);
    const rel = (await page.getAttribute('a#url', 'rel')) ?? '';
    for (const r of ['noopener', 'noreferrer', 'nofollow']) ensure(rel.split(/\s+/).includes(r), `a#url's rel is ${JSON.stringify(rel)}, lacks ${r}`);
    await page.screenshot({ path: join(ARTIFACTS, 'markup.png'), fullPage: false });
    // The search box renders labels that carry markup as text too.
    await page.keyboard.press('/');
    await page.keyboard.type(SEED.markup_query);
    await page.waitForTimeout(500);
    ensure(await page.evaluate(() => window.__pwned) === undefined,
      `label search results ran markup: window.__pwned = ${await page.evaluate(() => window.__pwned)}`);
    await page.goto(`${BASE}/queue?order=newest`);
    ensure(await page.evaluate(() => window.__pwned) === undefined, '/queue ran the document title\'s markup');
    record.untouched.push(xss);
  });

  await step('a forged decision without the CSRF token is refused', async () => {
    // Far enough down the queue that neither reviewer has opened it.
    const target = order[KEYS.length + 8];
    await page.goto(`${BASE}/doc/${target}?${FILTERS}`);
    const seed = await readDocument(page, target);
    const label = seed.top5[0].label;
    const [res] = await Promise.all([
      page.waitForNavigation(),
      page.evaluate(({ target, label }) => {
        const f = document.createElement('form');
        f.method = 'POST';
        f.action = `/doc/${target}/decide`;
        for (const [k, v] of Object.entries({ decision: 'accept', label })) {
          const i = document.createElement('input');
          i.type = 'hidden'; i.name = k; i.value = v; f.appendChild(i);
        }
        document.body.appendChild(f);
        f.submit();
      }, { target, label }),
    ]);
    ensure(res.status() === 403, `a form without csrf answered ${res.status()}, expected 403`);
    ensure(await page.$('#error'), 'the 403 page has no #error');
    const statuses = await page.evaluate(async ({ target, label }) => {
      const out = [];
      for (const body of [
        { decision: 'accept', label },
        { decision: 'accept', label, csrf: 'forged-token' },
        { decision: 'reject' },
      ]) {
        const r = await fetch(`/doc/${target}/decide`, { method: 'POST', body: new URLSearchParams(body), redirect: 'manual' });
        out.push(r.status);
      }
      const s = await fetch(`/doc/${target}/skip`, { method: 'POST', redirect: 'manual' });
      out.push(s.status);
      const l = await fetch('/logout', { method: 'POST', redirect: 'manual' });
      out.push(l.status);
      return out;
    }, { target, label });
    ensure(statuses.every((s) => s === 403), `forged POSTs answered ${JSON.stringify(statuses)}, expected 403 each`);
    // Still logged in, and the document is still waiting.
    const again = await page.goto(`${BASE}/doc/${target}`);
    ensure(again.status() === 200 && docIdOf(page.url()) === target, `after the forged POSTs /doc/${target} answered ${again.status()} at ${page.url()}`);
    record.refused.push(target);
  });

  await step('stats count what alice decided', async () => {
    await page.goto(`${BASE}/stats`);
    for (const sel of ['table#per-day', 'table#per-reviewer', 'table#accuracy', 'table#rejected']) {
      ensure(await page.$(sel), `/stats has no ${sel}`);
    }
    const rows = await page.$$eval('table#per-reviewer tr', (trs) => trs.map((tr) => [...tr.querySelectorAll('td')].map((td) => td.textContent.trim())));
    const mine = rows.find((r) => r[0] === ALICE.user);
    ensure(mine && parseInt(mine[1], 10) === record.decisions.length,
      `table#per-reviewer shows ${JSON.stringify(rows)}, expected ${ALICE.user} with ${record.decisions.length}`);
    const perDay = await page.$$eval('table#per-day tr', (trs) => trs.map((tr) => [...tr.querySelectorAll('td')].map((td) => td.textContent.trim())).filter((r) => r.length));
    const total = perDay.reduce((n, r) => n + parseInt(r[r.length - 1], 10), 0);
    ensure(total === record.decisions.length, `table#per-day adds up to ${total}, expected ${record.decisions.length}`);
    const accuracy = await page.$$eval('table#accuracy tr', (trs) => trs.map((tr) => [...tr.querySelectorAll('td')].map((td) => td.textContent.trim())));
    const model = accuracy.find((r) => r[0] === SEED.model_version);
    const n = record.decisions.length;
    const pct = (k) => `${(100 * k / n).toFixed(1)}%`;
    const top1 = pct(record.decisions.filter((d) => d.key === '1').length);
    const top5 = pct(record.decisions.filter((d) => d.decision === 'accept').length);
    ensure(model && parseInt(model[1], 10) === n && model[2] === top1 && model[3] === top5,
      `table#accuracy shows ${JSON.stringify(accuracy)}, expected ${SEED.model_version} with ${n} reviewed, ${top1} top 1, ${top5} in top 5`);
    const rejected = await page.textContent('table#rejected');
    const rej = record.decisions.find((d) => d.decision === 'reject');
    for (const l of rej.rejected) ensure(rejected.includes(l), `table#rejected does not list ${l}`);
    // The charts: reviews per day, accuracy per model version, the most
    // rejected categories, and the champion against its shadow.
    const bars = await page.$$eval('svg#chart-per-day rect.bar', (rs) => rs.map((r) => r.querySelector('title').textContent));
    ensure(bars.length === perDay.length, `svg#chart-per-day has ${bars.length} bars for ${perDay.length} days`);
    ensure(await page.$('svg#chart-accuracy polyline.series'), 'svg#chart-accuracy draws no line');
    const rejectedBars = await page.$$eval('svg#chart-rejected rect.bar', (rs) => rs.length);
    ensure(rejectedBars === (await page.$$eval('table#rejected tbody tr', (t) => t.length)), `svg#chart-rejected has ${rejectedBars} bars`);
    const shadow = await page.$$eval('table#shadow tbody tr', (trs) => trs.map((tr) => [...tr.querySelectorAll('td')].map((td) => td.textContent.trim())));
    const labelled = record.decisions.filter((d) => d.label);
    const shadowTop1 = labelled.filter((d) => d.key === '5').length;
    ensure(shadow.length === 1 && shadow[0][0] === SEED.model_version && shadow[0][1] === SEED.shadow_version
      && parseInt(shadow[0][2], 10) === labelled.length && shadow[0][4] === `${(100 * shadowTop1 / labelled.length).toFixed(1)}%`,
      `table#shadow shows ${JSON.stringify(shadow)}, expected ${SEED.model_version} against ${SEED.shadow_version} on ${labelled.length} decisions, shadow top 1 on ${shadowTop1}`);
    ensure(await page.$$eval('svg#chart-shadow-0 rect.bar', (rs) => rs.length) > 0, 'svg#chart-shadow-0 draws no bars');
    await page.screenshot({ path: join(ARTIFACTS, 'stats.png'), fullPage: true });
  });

  await step('identities: the profile beside its candidates, decided with the keyboard (1-3, 0)', async () => {
    const want = SEED.identities;
    await page.goto(`${BASE}/identities`);
    const rows = await page.$$eval('table#identities tbody tr td:first-child', (tds) => tds.map((td) => td.textContent.trim()));
    ensure(JSON.stringify(rows) === JSON.stringify(want.map((w) => w.row)),
      `/identities lists ${JSON.stringify(rows)}, expected ${JSON.stringify(want.map((w) => w.row))} (least certain first)`);
    ensure(await page.evaluate(() => window.__pwned) === undefined, '/identities ran markup from a profile name');
    await Promise.all([page.waitForURL(/\/identity\//), page.click('a#identity-next')]);
    for (const [i, w] of want.entries()) {
      const row = decodeURIComponent(new URL(page.url()).pathname.replace(/^\/identity\//, ''));
      ensure(row === w.row, `profile ${i + 1} handed out is ${row}, expected ${w.row}`);
      const name = await page.textContent('#profile-name');
      ensure(name === w.name, `#profile-name shows ${JSON.stringify(name)}, expected the literal ${JSON.stringify(w.name)}`);
      ensure(await page.evaluate(() => window.__pwned) === undefined, `the profile ${w.row} ran its name's markup`);
      const shown = await page.$$eval('#candidates tr.candidate', (trs) => trs.map((tr) => tr.dataset.id));
      ensure(JSON.stringify(shown) === JSON.stringify(w.candidates),
        `#candidates shows ${JSON.stringify(shown)}, expected ${JSON.stringify(w.candidates)}`);
      const levels = await page.$$eval('#candidates tr.candidate td.level', (tds) => tds.length);
      ensure(levels === shown.length * 7, `#candidates shows ${levels} field levels for ${shown.length} candidates, expected 7 each`);
      if (i === 0) await page.screenshot({ path: join(ARTIFACTS, 'identity.png'), fullPage: true });
      const before = page.url();
      await Promise.all([page.waitForURL((u) => u.toString() !== before), page.keyboard.press(w.key)]);
      record.identities.push({ row: w.row, key: w.key, choice: w.key === '0' ? 'none' : w.candidates[Number(w.key) - 1] });
    }
    ensure(new URL(page.url()).pathname === '/identities', `after the last profile the browser is at ${page.url()}, expected /identities`);
    const left = await page.$$eval('table#identities tbody tr', (t) => t.length);
    ensure(left === 0, `/identities still lists ${left} profiles after they were all decided`);
  });

  await step('log out', async () => {
    await Promise.all([page.waitForURL(/\/login/), page.click('form#logout [type=submit], form#logout button')]);
    const res = await alice.request.get(`${BASE}/queue`, { maxRedirects: 0 });
    ensure(res.status() === 303, `/queue after logout answered ${res.status()}, expected 303 to /login`);
  });

  await step('login redirects only to local paths; failed logins are rate limited', async () => {
    const ctx = await browser.newContext({ viewport });
    ctx.setDefaultTimeout(5000);
    const p = await ctx.newPage();
    current = p;
    // Redirects are not followed: a wrong answer is reported, not visited.
    await p.route(/^(?!http:\/\/127\.0\.0\.1)/, (route) => route.abort());
    for (const next of ['//evil.example/', '/\\evil.example/', 'https://evil.example/']) {
      await p.goto(`${BASE}/login?next=${encodeURIComponent(next)}`);
      await p.fill('form#login input[name=username]', ALICE.user);
      await p.fill('form#login input[name=password]', ALICE.password);
      const posted = p.waitForResponse((r) => r.request().method() === 'POST' && r.url().endsWith('/login'));
      await p.click('form#login button[type=submit]');
      const res = await posted;
      const location = res.headers().location ?? '';
      ensure(res.status() === 303 && location.startsWith('/') && !location.startsWith('//') && !location.startsWith('/\\'),
        `a login with next=${next} redirected to ${JSON.stringify(location)}, expected a local path`);
      await p.waitForLoadState();
    }
    let limited = null;
    for (let i = 1; i <= 7 && !limited; i++) {
      await p.goto(`${BASE}/login`);
      await p.fill('form#login input[name=username]', 'mallory');
      await p.fill('form#login input[name=password]', `guess-${i}`);
      const [res] = await Promise.all([p.waitForNavigation(), p.click('form#login button[type=submit]')]);
      if (res.status() === 429) limited = i;
      else ensure(res.status() === 401, `failed login ${i} answered ${res.status()}, expected 401 or 429`);
    }
    ensure(limited !== null, 'seven failed logins within a minute were never answered 429');
    const error = await p.textContent('#error');
    ensure(/wait|try again/i.test(error), `the 429 page's #error says ${JSON.stringify(error)}, expected to be told to wait`);
    await ctx.close();
    current = page;
  });
}

const t0 = Date.now();
let failed = null;
try {
  await main();
} catch (e) {
  failed = e;
}
writeFileSync(join(ARTIFACTS, 'decisions.json'), JSON.stringify({ ...record, timings, ok: failed === null }, null, 2));
if (failed) {
  process.stdout.write('FAILED\n');
  console.error(`review browser test failed${current ? ` on ${current.url()}` : ''}: ${failed.stack ?? failed}`);
  process.exitCode = 1;
} else {
  console.log(`review browser test passed in ${Date.now() - t0} ms`);
}
