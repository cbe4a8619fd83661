// stripe-sync-engine 0.48.5 behind a bare Node HTTP server, for bench.run's same-run comparison:
// the raw body and the Stripe-Signature header go to processWebhook, which verifies and upserts.
// CommonJS on purpose: the package's ESM build skips its migrations (`__dirname is not defined`).
// Env: DATABASE_URL, STRIPE_WEBHOOK_SECRET, PORT, NODE_PATH (the scratch folder's node_modules).
const http = require("node:http");
const { StripeSync, runMigrations } = require("@supabase/stripe-sync-engine");

async function main() {
  const databaseUrl = process.env.DATABASE_URL;
  await runMigrations({ databaseUrl, schema: "stripe" });
  const sync = new StripeSync({
    poolConfig: { connectionString: databaseUrl, max: 10 },
    stripeSecretKey: "sk_test_bench_never_called",
    stripeWebhookSecret: process.env.STRIPE_WEBHOOK_SECRET,
  });
  http
    .createServer((request, response) => {
      const chunks = [];
      request.on("data", (chunk) => chunks.push(chunk));
      request.on("end", async () => {
        let status = 200;
        try {
          await sync.processWebhook(Buffer.concat(chunks), request.headers["stripe-signature"]);
        } catch (error) {
          status = /signature/i.test(String(error && error.message)) ? 400 : 500;
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
