// The JavaScript examples of the mq9 integration guide, run against a live node.
//
//   node guide.mjs nats://127.0.0.1:4222 [section ...]
//
// Sections: create_mailbox, competing_workers, human_in_the_loop (all by default).
// Each prints "ok <section> <details>" or "FAIL <section>: <why>"; the exit code is 0 only
// if every section passed. The code inside each section is the guide's, with only the
// scaffolding around it (connections, the process()/showApprovalUI() the guide leaves to
// the reader, and the checks).
import { connect, JSONCodec } from "nats";

const url = process.argv[2] || "nats://127.0.0.1:4222";
const only = process.argv.slice(3);
const TIMEOUT_MS = 5000;

function assert(cond, what) {
  if (!cond) throw new Error(what);
}

function withTimeout(promise, what, ms = TIMEOUT_MS) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out: ${what}`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---- Create a mailbox ---------------------------------------------------------------------
async function createMailbox() {
  const nc = await connect({ servers: url });
  try {
    const jc = JSONCodec();
    const resp = await nc.request(
      "$mq9.AI.MAILBOX.CREATE",
      jc.encode({ type: "standard", ttl: 3600 })
    );
    const { mail_id, token } = jc.decode(resp.data);

    assert(/^m-([a-z2-7]{20,}|[0-9a-f]{24,})$/.test(mail_id), `mail_id ${mail_id}`);
    assert(/^tok-([a-z2-7]{26,}|[0-9a-f]{32,})$/.test(token), `token ${token}`);
    const q = jc.decode(
      (await nc.request(`$mq9.AI.MAILBOX.QUERY.${mail_id}`, jc.encode({ token }))).data
    );
    assert(q.unread === 0, `fresh mailbox query ${JSON.stringify(q)}`);
    return `mail_id=${mail_id}`;
  } finally {
    await nc.close();
  }
}

// ---- Task broadcast with competing workers ------------------------------------------------
async function competingWorkers() {
  const jc = JSONCodec();
  const master = await connect({ servers: url });
  const masterId = jc.decode(
    (await master.request("$mq9.AI.MAILBOX.CREATE", jc.encode({ type: "standard", ttl: 3600 })))
      .data
  ).mail_id;

  const process = async (task) => ({ doubled: task.data.n * 2 });
  const handled = {};
  const workerConns = [];
  const loops = [];
  for (let w = 0; w < 3; w++) {
    const nc = await connect({ servers: url }); // each worker its own connection
    workerConns.push(nc);
    const workerId = `worker-${w}`;
    handled[workerId] = [];
    // Workers subscribe with shared queue group — each task goes to exactly one worker
    const sub = nc.subscribe("$mq9.AI.BROADCAST.task.available",
      { queue: "task-workers" });
    loops.push((async () => {
      for await (const msg of sub) {
        const task = jc.decode(msg.data);
        handled[workerId].push(task.task_id);
        const result = await process(task);
        await nc.publish(`$mq9.AI.INBOX.${masterId}.normal`,
          jc.encode({ from: workerId, task_id: task.task_id, result }));
      }
    })());
    await nc.flush();
  }

  // The master collects results in its own mailbox
  const N = 30;
  const results = [];
  const inbox = master.subscribe(`$mq9.AI.INBOX.${masterId}.*`);
  const collected = (async () => {
    for await (const m of inbox) {
      results.push(jc.decode(m.data));
      if (results.length === N) break;
    }
  })();

  // Master broadcasts task
  for (let i = 0; i < N; i++) {
    const nc = master;
    await nc.publish("$mq9.AI.BROADCAST.task.available",
      jc.encode({ from: masterId, task_id: `t-${String(i).padStart(3, "0")}`, data: { n: i } }));
  }
  await master.flush();
  await withTimeout(collected, `results (${results.length}/${N})`);
  await sleep(200);

  const ids = results.map((r) => r.task_id).sort();
  const expected = Array.from({ length: N }, (_, i) => `t-${String(i).padStart(3, "0")}`);
  assert(JSON.stringify(ids) === JSON.stringify(expected), `results ${JSON.stringify(ids)}`);
  for (const r of results) {
    assert(r.result.doubled === Number(r.task_id.slice(2)) * 2, `result ${JSON.stringify(r)}`);
  }
  const all = Object.values(handled).flat();
  assert(all.length === N && new Set(all).size === N,
    `each task exactly once: ${JSON.stringify(handled)}`);
  const busy = Object.values(handled).filter((t) => t.length > 0).length;
  assert(busy >= 2, `one worker took every task: ${JSON.stringify(handled)}`);

  for (const nc of workerConns) await nc.close();
  await Promise.all(loops);
  await master.close();
  return "split " + Object.entries(handled).map(([w, t]) => `${w}=${t.length}`).join(",");
}

// ---- Human-in-the-loop approval -------------------------------------------------------------
async function humanInTheLoop() {
  const jc = JSONCodec();
  const create = async (nc, ttl) =>
    jc.decode((await nc.request("$mq9.AI.MAILBOX.CREATE", jc.encode({ type: "standard", ttl })))
      .data).mail_id;

  const agent = await connect({ servers: url });
  const agentMailID = await create(agent, 3600);
  const humanMailID = await create(agent, 86400); // the human's mailbox; the human is away

  {
    const nc = agent;
    // Agent sends approval request
    await nc.publish(`$mq9.AI.INBOX.${humanMailID}.urgent`, jc.encode({
      from: agentMailID,
      type: "approval_request",
      correlation_id: "approval-001",
      content: "Call external fraud API — estimated cost $50",
      reply_to: `$mq9.AI.INBOX.${agentMailID}.normal`
    }));
    await nc.flush();
  }

  // The agent waits for the answer in its own mailbox
  const answers = agent.subscribe(`$mq9.AI.INBOX.${agentMailID}.*`, { max: 1 });
  const answered = (async () => {
    for await (const m of answers) return jc.decode(m.data);
  })();

  // Later, the human comes online. Human's client — same protocol, no special tooling
  const nc = await connect({ servers: url });
  const shown = [];
  const showApprovalUI = async (req) => {
    shown.push(req);
    return req.content.includes("$50");
  };
  const human = (async () => {
    for await (const msg of nc.subscribe(`$mq9.AI.INBOX.${humanMailID}.*`)) {
      const req = jc.decode(msg.data);
      const approved = await showApprovalUI(req);
      await nc.publish(req.reply_to, jc.encode({
        from: humanMailID,
        type: "approval_response",
        correlation_id: req.correlation_id,
        approved
      }));
      break; // one request is all this test sends
    }
  })();

  await withTimeout(human, "the human never saw the approval request");
  const answer = await withTimeout(answered, "the agent never got the approval response");
  assert(shown.length === 1 && shown[0].type === "approval_request", `shown ${JSON.stringify(shown)}`);
  assert(answer.type === "approval_response" && answer.correlation_id === "approval-001" &&
    answer.approved === true && answer.from === humanMailID, `answer ${JSON.stringify(answer)}`);
  await nc.close();
  await agent.close();
  return `approved=${answer.approved}`;
}

const sections = {
  create_mailbox: createMailbox,
  competing_workers: competingWorkers,
  human_in_the_loop: humanInTheLoop,
};

let failed = 0;
for (const [name, fn] of Object.entries(sections)) {
  if (only.length && !only.includes(name)) continue;
  try {
    const detail = await withTimeout(fn(), name, 20000);
    console.log(`ok ${name} ${detail}`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}: ${e && e.stack ? e.stack : e}`);
  }
}
process.exit(failed ? 1 : 0);
