// Creates a bucket on an S3-compatible endpoint (idempotent) and checks that objects can be written,
// read and deleted: the readiness probe of tests/support/start-s3.sh.
// Usage: node tests/support/s3-bucket.mjs ENDPOINT BUCKET ACCESS_KEY_ID SECRET_ACCESS_KEY [TIMEOUT_S]
import { createRequire } from "node:module";
import { join } from "node:path";

const [endpoint, bucket, accessKeyId, secretAccessKey, timeoutS = "60"] = process.argv.slice(2);
if (!endpoint || !bucket || !accessKeyId || !secretAccessKey) {
  console.error("usage: s3-bucket.mjs ENDPOINT BUCKET ACCESS_KEY_ID SECRET_ACCESS_KEY [TIMEOUT_S]");
  process.exit(2);
}
// The SDK is a dependency of @qlora/store; resolve it from there (works hoisted or not).
const require = createRequire(join(new URL("../../libs/store/", import.meta.url).pathname, "package.json"));
const s3 = await import(require.resolve("@aws-sdk/client-s3"));
const client = new s3.S3Client({
  endpoint,
  region: "us-east-1",
  forcePathStyle: true,
  credentials: { accessKeyId, secretAccessKey },
  requestChecksumCalculation: "WHEN_REQUIRED",
  responseChecksumValidation: "WHEN_REQUIRED",
  maxAttempts: 1,
});
const deadline = Date.now() + Number(timeoutS) * 1000;
let last;
for (;;) {
  try {
    try {
      await client.send(new s3.CreateBucketCommand({ Bucket: bucket }));
    } catch (e) {
      if (e?.name !== "BucketAlreadyOwnedByYou" && e?.name !== "BucketAlreadyExists") throw e;
    }
    const Key = `.probe-${process.pid}`;
    await client.send(new s3.PutObjectCommand({ Bucket: bucket, Key, Body: "ok" }));
    const got = await client.send(new s3.GetObjectCommand({ Bucket: bucket, Key }));
    if ((await got.Body.transformToString()) !== "ok") throw new Error("probe object read back wrong");
    await client.send(new s3.DeleteObjectCommand({ Bucket: bucket, Key }));
    console.log(`s3-bucket: ${endpoint}/${bucket} is ready`);
    process.exit(0);
  } catch (e) {
    last = e;
    if (Date.now() > deadline) break;
    await new Promise((r) => setTimeout(r, 250));
  }
}
console.error(`s3-bucket: ${endpoint}/${bucket} not ready after ${timeoutS}s: ${last?.name ?? ""} ${last?.message ?? last}`);
process.exit(1);
