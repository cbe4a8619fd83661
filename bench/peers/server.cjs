// stripe-sync-engine behind a bare Node HTTP server, for bench.run's same-run comparison: the raw
// body and the Stripe-Signature header go to processWebhook, which verifies and upserts.
// PEER_PACKAGE picks the version: @supabase/stripe-sync-engine (0.48.x) or @stripe/sync-engine (1.x).
// CommonJS on purpose: 0.48.5's ESM build skips its migrations (`__dirname is not defined`).
// 1.x would call the Stripe API at start for the account and download Stripe's OpenAPI spec in its
// migrations: it is given an account id and a customer-only spec file (OPENAPI_SPEC) instead.
// Env: DATABASE_URL, STRIPE_WEBHOOK_SECRET, PORT, PEER_PACKAGE, OPENAPI_SPEC, NODE_PATH.
const http = require("node:http");
const { StripeSync, runMigrations } = require(process.env.PEER_PACKAGE);

async function start(databaseUrl) {
  const config = {
    poolConfig: { connectionString: databaseUrl, max: 10 },
    stripeSecretKey: "sk_test_bench_never_called",
    stripeWebhookSecret: process.env.STRIPE_WEBHOOK_SECRET,
  };
  if (typeof StripeSync.create !== "function") {
    await runMigrations({ databaseUrl, schema: "stripe" });
    return new StripeSync(config);
  }
  await runMigrations({ databaseUrl, openApiSpecPath: process.env.OPENAPI_SPEC });
  return StripeSync.create({ ...config, stripeAccountId: "acct_bench" });
}

async function main() {
  const sync = await start(process.env.DATABASE_URL);
  const webhooks = sync.webhook ?? sync; // 1.x moved processWebhook to StripeSync#webhook
  http
    .createServer((request, response) => {
      const chunks = [];
      request.on("data", (chunk) => chunks.push(chunk));
      request.on("end", async () => {
        let status = 200;
        try {
          await webhooks.processWebhook(Buffer.concat(chunks), request.headers["stripe-signature"]);
        } catch (error) {
          status = /signature/i.test(String(error && error.message)) ? 400 : 500;
          if (status === 500) console.error(error);
        }
        // A Content-Length, not chunked: the same framing as the consumer's answers.
        const body = status === 200 ? '{"received":true}' : '{"error":"failed"}';
        response.writeHead(status, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) });
        response.end(body);
      });
    })
    .listen(Number(process.env.PORT), "127.0.0.1", () => console.log("listening"));
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
