'use strict';
// The BullMQ 6 peer of `make bench`. The parent process is the producer (and a QueueEvents
// listener); the worker runs in a child process, like charai's worker. Full job state is kept
// (no removeOnComplete). Times are wall clock in ms (performance.timeOrigin + now()), so the
// two processes share one clock.
//
//   node bullmq_bench.js '<json options>'    prints one JSON line per measured run, then {"done":true}
//
// options: {redis, mode: pickup|e2e|drain|io|progress|addbulk, runs, n, warmup, concurrency,
//           interval_ms, submit_concurrency, url, seconds, batch}
// addbulk (B4b's peer): submit capacity only, `submit_concurrency` addBulk calls of `batch` jobs
// in flight for `seconds`; the worker does not run (as charai's B4 runs no workers).
const { fork } = require('child_process');
const { Queue, Worker, QueueEvents } = require('bullmq');
const IORedis = require('ioredis');

const now = () => performance.timeOrigin + performance.now();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const connect = (url) => new IORedis(url, { maxRetriesPerRequest: null });
const pct = (values, q) => {
  if (!values.length) return null;
  const s = [...values].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.round(q * s.length) - 1))];
};

// ---------------------------------------------------------------------------------- worker
function runWorker(o) {
  const connection = connect(o.redis);
  let expect = Infinity;
  let count = 0;
  let firstStart = Infinity;
  let lastEnd = 0;
  let cpu0 = process.cpuUsage();
  let rssBase = process.memoryUsage().rss;
  let rssPeak = rssBase;
  setInterval(() => { rssPeak = Math.max(rssPeak, process.memoryUsage().rss); }, 50).unref();
  const body = (text) => JSON.stringify({ model: 'glm-tts', input: text, voice: 'tongtong', response_format: 'wav' });
  const worker = new Worker(o.queue, async (job) => {
    const start = now();
    if (start < firstStart) firstStart = start;
    if (o.mode === 'pickup') process.send({ t: 'start', id: job.id, lat: start - job.data.t0 });
    if (o.mode === 'io') {
      const r = await fetch(o.url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: body(job.data.text) });
      const buf = await r.arrayBuffer();
      if (r.status !== 200) throw new Error(`provider answered ${r.status}`);
      return { bytes: buf.byteLength };
    }
    if (o.mode === 'progress') {
      for (let i = 0; i < o.events; i++) {
        await sleep(o.interval_ms);
        await job.updateProgress({ p: i, t: now() });
      }
    }
    return { ok: true };
  }, { connection, concurrency: o.concurrency, autorun: o.mode !== 'drain' && o.mode !== 'addbulk' });
  worker.on('completed', () => {
    count += 1;
    lastEnd = now();
    if (count === expect) {
      const cpu = process.cpuUsage(cpu0);
      process.send({ t: 'done', firstStart, lastEnd, cpuMs: (cpu.user + cpu.system) / 1000, rssBase, rssPeak });
    }
  });
  worker.on('failed', (job, err) => process.send({ t: 'failed', error: String(err) }));
  process.on('message', (m) => {
    if (m.t === 'expect') {
      expect = m.n; count = 0; firstStart = Infinity; lastEnd = 0; cpu0 = process.cpuUsage();
      rssBase = process.memoryUsage().rss; rssPeak = rssBase;
      process.send({ t: 'ready' });
    } else if (m.t === 'run') {
      worker.run();
    } else if (m.t === 'pause') {
      worker.pause(true).then(() => process.send({ t: 'paused' }));
    } else if (m.t === 'resume') {
      worker.resume();
    } else if (m.t === 'exit') {
      worker.close().then(() => process.exit(0));
    }
  });
  worker.waitUntilReady().then(() => process.send({ t: 'up', pid: process.pid }));
}

// -------------------------------------------------------------------------------- producer
async function runProducer(o) {
  const queue = new Queue(o.queue, { connection: connect(o.redis) });
  await queue.waitUntilReady();
  const child = fork(__filename, [JSON.stringify({ ...o, role: 'worker' })]);
  const inbox = [];
  let waiter = null;
  const starts = new Map();
  child.on('message', (m) => {
    if (m.t === 'start') { starts.set(m.id, m.lat); return; }
    if (m.t === 'failed') { console.error('job failed', m.error); return; }
    inbox.push(m);
    if (waiter) { const w = waiter; waiter = null; w(); }
  });
  const next = async (type) => {
    for (;;) {
      const i = inbox.findIndex((m) => m.t === type);
      if (i >= 0) return inbox.splice(i, 1)[0];
      await new Promise((r) => { waiter = r; });
    }
  };
  const up = await next('up');
  const events = new QueueEvents(o.queue, { connection: connect(o.redis) });
  await events.waitUntilReady();
  const active = new Map();
  const progress = [];
  events.on('active', ({ jobId }) => active.set(jobId, now()));
  events.on('progress', ({ data }) => { if (data && data.t) progress.push(now() - data.t); });

  async function addMany(n, conc, tag, data) {
    let i = 0;
    const lane = async () => {
      while (i < n) {
        const k = i++;
        await queue.add('job', data(k), { jobId: `${tag}-${k}` });
      }
    };
    await Promise.all(Array.from({ length: Math.min(conc, n) }, lane));
  }

  async function addBulkLoad(seconds, tag) {
    const until = now() + seconds * 1000;
    let calls = 0;
    let k = 0;
    const lane = async () => {
      while (now() < until) {
        const base = k;
        k += o.batch;
        const jobs = Array.from({ length: o.batch }, (_, j) => ({
          name: 'job', data: { text: `bull ${tag} ${base + j}` }, opts: { jobId: `${tag}-${base + j}` },
        }));
        await queue.addBulk(jobs);
        calls++;
      }
    };
    const t = now();
    await Promise.all(Array.from({ length: o.submit_concurrency }, lane));
    const secs = (now() - t) / 1000;
    await queue.drain(true); // the next run starts from an empty queue
    return { calls_per_s: calls / secs, tasks_per_s: (calls * o.batch) / secs };
  }

  for (let r = 0; r <= o.runs; r++) {
    const n = r ? o.n : Math.min(o.n, o.warmup);
    const tag = `r${r}-${Date.now()}`;
    child.send({ t: 'expect', n });
    await next('ready');
    let result;
    if (o.mode === 'pickup') {
      starts.clear(); active.clear();
      const sent = new Map();
      const t = now();
      const pending = [];
      for (let i = 0; i < n; i++) {
        const wait = t + i * o.interval_ms - now();
        if (wait > 0) await sleep(wait);
        const t0 = now();
        sent.set(`${tag}-${i}`, t0);
        pending.push(queue.add('job', { t0 }, { jobId: `${tag}-${i}` }));
      }
      await Promise.all(pending);
      await next('done');
      await sleep(100);
      const lat = [...starts.values()];
      const act = [...sent.entries()].filter(([id]) => active.has(id)).map(([id, t0]) => active.get(id) - t0);
      result = {
        start_ms_p50: pct(lat, 0.5), start_ms_p99: pct(lat, 0.99),
        active_event_ms_p50: pct(act, 0.5), active_event_ms_p99: pct(act, 0.99),
      };
    } else if (o.mode === 'e2e' || o.mode === 'io') {
      const first = now();
      await addMany(n, o.submit_concurrency, tag, (k) => ({ text: `bull ${tag} ${k}` }));
      const submitted = now();
      const d = await next('done');
      const makespan = (d.lastEnd - first) / 1000;
      result = {
        tasks: n, makespan_s: makespan, tasks_per_s: n / makespan, submit_per_s: n / ((submitted - first) / 1000),
        worker_cpu_ms: d.cpuMs, rss_base_mb: d.rssBase / 1048576, rss_peak_mb: d.rssPeak / 1048576,
        first_start: d.firstStart, last_end: d.lastEnd, first_submit: first,
      };
    } else if (o.mode === 'drain') {
      if (r > 0) {
        child.send({ t: 'pause' });
        await next('paused');
      }
      await addMany(n, o.submit_concurrency, tag, (k) => ({ text: `bull ${tag} ${k}` }));
      child.send({ t: r === 0 ? 'run' : 'resume' });
      const d = await next('done');
      result = { tasks: n, tasks_per_s: (n - 1) / ((d.lastEnd - d.firstStart) / 1000), worker_cpu_ms: d.cpuMs };
    } else if (o.mode === 'addbulk') {
      result = await addBulkLoad(r ? o.seconds : Math.min(o.seconds, 3), tag);
    } else if (o.mode === 'progress') {
      progress.length = 0;
      await addMany(n, n, tag, () => ({}));
      await next('done');
      await sleep(200);
      result = { updates: progress.length, lag_ms_p50: pct(progress, 0.5), lag_ms_p99: pct(progress, 0.99) };
    }
    if (r > 0) console.log(JSON.stringify({ run: r, worker_pid: up.pid, ...result }));
  }
  child.send({ t: 'exit' });
  await events.close();
  await queue.close();
  console.log(JSON.stringify({ done: true }));
  process.exit(0);
}

const opts = JSON.parse(process.argv[2] || '{}');
if (opts.role === 'worker') runWorker(opts);
else runProducer({ queue: `bench-${process.pid}`, runs: 3, warmup: 100, concurrency: 1, interval_ms: 10, submit_concurrency: 64, ...opts })
  .catch((e) => { console.error(e); process.exit(1); });
