#!/usr/bin/env python3
"""storage-manager driven by boto3, a real S3 client.

Usage: boto3_client.py ENDPOINT ACCESS_KEY SECRET_KEY [MODE [UPLOAD_ID [ETAG]]]

MODE is `all` (the default: every check below), `expiry-start` (leaves a
multipart upload with two 1 MiB parts in bucket `expiry`, as a client killed
part-way would, and prints `UPLOAD <id>`), `expiry-gone` (checks that
upload UPLOAD_ID was removed: not listed, NoSuchUpload to every request),
`grants-restricted` (run with a key whose grants are
{"app-data": "read-write", "shared-*": "read"}; buckets app-data,
shared-docs and secret-backups exist, with shared-docs/readme.txt and
secret-backups/db.sqlite), `grants-full` (a key without grants sees and
reads all three) or `multipart-ref` (a three-part upload completed by
reference: whole body, ETag, ranges across part boundaries, ranged
UploadPartCopy and CopyObject from it, and CompleteMultipartUpload's
`If-None-Match: *` and `If-Match` refused, an upload left for a replacement;
prints `MPREF <bucket> <upload id> <size> <upload id 2> <etag>` for the
caller to look at the disk) then `multipart-ref-replace UPLOAD_ID_2 ETAG`
(completes that upload with `If-Match: ETAG`, replacing the object).

Exits 0 when every check passed; 3 when boto3 cannot be imported (the Rust
test decides whether that is a skip or a failure); 1 with a message on the
first failed check.
"""
import hashlib
import io
import os
import sys
import tempfile

try:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError
    from boto3.s3.transfer import TransferConfig
except ImportError as e:  # pragma: no cover
    print(f"boto3 is not importable: {e}", file=sys.stderr)
    sys.exit(3)

endpoint, access_key, secret_key = sys.argv[1:4]


def client(secret=secret_key):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1, "mode": "standard"},
            connect_timeout=10,
            read_timeout=120,
        ),
    )


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def error_code(fn):
    try:
        fn()
    except ClientError as e:
        return e.response["Error"]["Code"]
    return None


s3 = client()
print(f"boto3 {boto3.__version__}")
MiB = 1024 * 1024
mode = sys.argv[4] if len(sys.argv) > 4 else "all"

if mode == "expiry-start":
    s3.create_bucket(Bucket="expiry")
    up = s3.create_multipart_upload(Bucket="expiry", Key="abandoned.bin")["UploadId"]
    for n in (1, 2):
        s3.upload_part(Bucket="expiry", Key="abandoned.bin", UploadId=up, PartNumber=n, Body=os.urandom(MiB))
    listed = s3.list_multipart_uploads(Bucket="expiry").get("Uploads", [])
    check([(u["Key"], u["UploadId"]) for u in listed] == [("abandoned.bin", up)], "the abandoned upload is listed")
    parts = s3.list_parts(Bucket="expiry", Key="abandoned.bin", UploadId=up).get("Parts", [])
    check([(p["PartNumber"], p["Size"]) for p in parts] == [(1, MiB), (2, MiB)], "its two parts are listed")
    print(f"UPLOAD {up}")
    sys.exit(0)

if mode == "expiry-gone":
    up = sys.argv[5]
    check("Uploads" not in s3.list_multipart_uploads(Bucket="expiry"), "the expired upload is not listed")
    check(error_code(lambda: s3.list_parts(Bucket="expiry", Key="abandoned.bin", UploadId=up)) == "NoSuchUpload", "ListParts of the expired upload -> NoSuchUpload")
    check(error_code(lambda: s3.upload_part(Bucket="expiry", Key="abandoned.bin", UploadId=up, PartNumber=3, Body=b"late")) == "NoSuchUpload", "UploadPart to the expired upload -> NoSuchUpload")
    check(error_code(lambda: s3.complete_multipart_upload(Bucket="expiry", Key="abandoned.bin", UploadId=up,
          MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": '"00000000000000000000000000000000"'}]})) == "NoSuchUpload", "completing the expired upload -> NoSuchUpload")
    print("EXPIRY CHECKS PASSED")
    sys.exit(0)

def denied(fn, bucket, perm, what):
    """fn fails with AccessDenied (403) naming `bucket` and `perm`."""
    try:
        fn()
    except ClientError as e:
        err, status = e.response["Error"], e.response["ResponseMetadata"]["HTTPStatusCode"]
        msg = err.get("Message", "")
        # HEAD answers carry no body: botocore reports the status only.
        ok = status == 403 and (err["Code"] == "403" or (err["Code"] == "AccessDenied" and '"%s"' % bucket in msg and "needs %s permission" % perm in msg))
        check(ok, "%s -> AccessDenied naming %s and %s (got %s %s: %s)" % (what, bucket, perm, status, err["Code"], msg))
        return
    check(False, "%s -> AccessDenied (it succeeded)" % what)


if mode == "grants-restricted":
    import urllib.error
    import urllib.request
    names = [b["Name"] for b in s3.list_buckets()["Buckets"]]
    check(names == ["app-data", "shared-docs"], "ListBuckets shows only the buckets the key may read (got %r)" % names)
    # Its own bucket: everything.
    s3.put_object(Bucket="app-data", Key="a.txt", Body=b"mine")
    check(s3.get_object(Bucket="app-data", Key="a.txt")["Body"].read() == b"mine", "PUT and GET in the read-write bucket")
    check(s3.head_object(Bucket="app-data", Key="a.txt")["ContentLength"] == 4, "HEAD in the read-write bucket")
    check([o["Key"] for o in s3.list_objects_v2(Bucket="app-data")["Contents"]] == ["a.txt"], "list the read-write bucket")
    s3.copy_object(Bucket="app-data", Key="b.txt", CopySource={"Bucket": "app-data", "Key": "a.txt"})
    check(s3.get_object(Bucket="app-data", Key="b.txt")["Body"].read() == b"mine", "copy within the read-write bucket")
    up = s3.create_multipart_upload(Bucket="app-data", Key="mp.bin")["UploadId"]
    part = s3.upload_part(Bucket="app-data", Key="mp.bin", UploadId=up, PartNumber=1, Body=b"multi")
    check(len(s3.list_parts(Bucket="app-data", Key="mp.bin", UploadId=up)["Parts"]) == 1, "ListParts in the read-write bucket")
    s3.complete_multipart_upload(Bucket="app-data", Key="mp.bin", UploadId=up, MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]})
    check(s3.get_object(Bucket="app-data", Key="mp.bin")["Body"].read() == b"multi", "multipart upload in the read-write bucket")
    s3.delete_object(Bucket="app-data", Key="b.txt")
    check(error_code(lambda: s3.head_object(Bucket="app-data", Key="b.txt")) == "404", "DELETE in the read-write bucket")
    # A read-only bucket (matched by the prefix shared-*): read, and copy from it; no writes.
    check(s3.get_object(Bucket="shared-docs", Key="readme.txt")["Body"].read() == b"shared", "GET in the read-only bucket")
    check(len(s3.list_objects_v2(Bucket="shared-docs")["Contents"]) == 1, "list the read-only bucket")
    s3.copy_object(Bucket="app-data", Key="readme-copy.txt", CopySource={"Bucket": "shared-docs", "Key": "readme.txt"})
    check(s3.get_object(Bucket="app-data", Key="readme-copy.txt")["Body"].read() == b"shared", "copy from the read-only bucket into the read-write one")
    denied(lambda: s3.put_object(Bucket="shared-docs", Key="x", Body=b"x"), "shared-docs", "read-write", "PUT into the read-only bucket")
    denied(lambda: s3.delete_object(Bucket="shared-docs", Key="readme.txt"), "shared-docs", "read-write", "DELETE in the read-only bucket")
    denied(lambda: s3.copy_object(Bucket="shared-docs", Key="c", CopySource={"Bucket": "app-data", "Key": "a.txt"}), "shared-docs", "read-write", "copy into the read-only bucket")
    denied(lambda: s3.create_multipart_upload(Bucket="shared-docs", Key="m"), "shared-docs", "read-write", "multipart upload into the read-only bucket")
    # A bucket it has no grant for: nothing at all.
    other = "secret-backups"
    denied(lambda: s3.get_object(Bucket=other, Key="db.sqlite"), other, "read", "GET from another bucket")
    denied(lambda: s3.head_object(Bucket=other, Key="db.sqlite"), other, "read", "HEAD in another bucket")
    denied(lambda: s3.head_bucket(Bucket=other), other, "read", "HeadBucket of another bucket")
    denied(lambda: s3.list_objects_v2(Bucket=other), other, "read", "ListObjectsV2 of another bucket")
    denied(lambda: s3.list_objects(Bucket=other), other, "read", "ListObjects of another bucket")
    denied(lambda: s3.put_object(Bucket=other, Key="evil", Body=b"x"), other, "read-write", "PUT into another bucket")
    denied(lambda: s3.delete_object(Bucket=other, Key="db.sqlite"), other, "read-write", "DELETE in another bucket")
    denied(lambda: s3.delete_objects(Bucket=other, Delete={"Objects": [{"Key": "db.sqlite"}]}), other, "read-write", "DeleteObjects in another bucket")
    denied(lambda: s3.delete_bucket(Bucket=other), other, "read-write", "DeleteBucket of another bucket")
    denied(lambda: s3.list_multipart_uploads(Bucket=other), other, "read-write", "ListMultipartUploads of another bucket")
    denied(lambda: s3.copy_object(Bucket="app-data", Key="stolen", CopySource={"Bucket": other, "Key": "db.sqlite"}), other, "read", "copy from another bucket")
    up = s3.create_multipart_upload(Bucket="app-data", Key="stolen-mp")["UploadId"]
    denied(lambda: s3.upload_part_copy(Bucket="app-data", Key="stolen-mp", UploadId=up, PartNumber=1, CopySource={"Bucket": other, "Key": "db.sqlite"}), other, "read", "UploadPartCopy from another bucket")
    s3.abort_multipart_upload(Bucket="app-data", Key="stolen-mp", UploadId=up)
    check(error_code(lambda: s3.head_object(Bucket="app-data", Key="stolen")) == "404", "the refused copy stored nothing")
    denied(lambda: s3.create_bucket(Bucket="not-mine"), "not-mine", "read-write", "CreateBucket outside the grants")
    # Presigned URLs are checked against the signing key's grants.
    url = s3.generate_presigned_url("get_object", Params={"Bucket": other, "Key": "db.sqlite"}, ExpiresIn=300)
    try:
        urllib.request.urlopen(url).read()
        check(False, "a presigned GET from another bucket is refused")
    except urllib.error.HTTPError as e:
        body = e.read().decode()
        check(e.code == 403 and "<Code>AccessDenied</Code>" in body and other in body, "presigned GET from another bucket -> 403 AccessDenied (%s)" % body)
    url = s3.generate_presigned_url("get_object", Params={"Bucket": "app-data", "Key": "a.txt"}, ExpiresIn=300)
    check(urllib.request.urlopen(url).read() == b"mine", "presigned GET from its own bucket")
    print("GRANTS CHECKS PASSED")
    sys.exit(0)

if mode == "multipart-ref":
    b = "mp-ref"
    s3.create_bucket(Bucket=b)
    sizes = [5 * MiB, 5 * MiB + 12345, 3 * MiB + 7]
    bodies = [os.urandom(n) for n in sizes]
    whole = b"".join(bodies)
    up = s3.create_multipart_upload(Bucket=b, Key="three.bin", ContentType="application/x-three")["UploadId"]
    done = []
    for i, body in enumerate(bodies, 1):
        r = s3.upload_part(Bucket=b, Key="three.bin", UploadId=up, PartNumber=i, Body=body)
        done.append({"PartNumber": i, "ETag": r["ETag"]})
    # Sent again (a retry): the part is replaced, under a new nonce prefix.
    r = s3.upload_part(Bucket=b, Key="three.bin", UploadId=up, PartNumber=2, Body=bodies[1])
    check(r["ETag"] == done[1]["ETag"], "a part sent again has the same ETag")
    want = hashlib.md5(b"".join(hashlib.md5(x).digest() for x in bodies)).hexdigest() + "-3"
    r = s3.complete_multipart_upload(Bucket=b, Key="three.bin", UploadId=up, MultipartUpload={"Parts": done},
                                     IfNoneMatch="*")
    check(r["ETag"] == '"%s"' % want, "three-part completion (If-None-Match: * on a free key) ETag md5(part md5s)-3")
    h = s3.head_object(Bucket=b, Key="three.bin")
    check(h["ETag"] == '"%s"' % want and h["ContentLength"] == len(whole), "HEAD of the three-part object: ETag and size")
    check(h["ContentType"] == "application/x-three", "content type kept")
    check(s3.get_object(Bucket=b, Key="three.bin")["Body"].read() == whole, "three-part object reads whole")
    b1, b2 = sizes[0], sizes[0] + sizes[1]
    for a, z in [(b1 - 10, b1 + 9), (b1 - 1, b1), (b1, b1), (b1 - 70000, b2 + 70000), (3, len(whole) - 4), (b2, len(whole) - 1)]:
        r = s3.get_object(Bucket=b, Key="three.bin", Range="bytes=%d-%d" % (a, z))
        check(r["Body"].read() == whole[a:z + 1] and r["ContentRange"] == "bytes %d-%d/%d" % (a, z, len(whole)),
              "Range %d-%d across part boundaries" % (a, z))
    check(s3.get_object(Bucket=b, Key="three.bin", Range="bytes=-100")["Body"].read() == whole[-100:], "suffix Range")
    # Copies out of it: CopyObject, and UploadPartCopy of a range spanning a boundary.
    s3.copy_object(Bucket=b, Key="copy.bin", CopySource={"Bucket": b, "Key": "three.bin"})
    check(s3.get_object(Bucket=b, Key="copy.bin")["Body"].read() == whole, "CopyObject of a three-part object")
    up2 = s3.create_multipart_upload(Bucket=b, Key="pc.bin")["UploadId"]
    r = s3.upload_part_copy(Bucket=b, Key="pc.bin", UploadId=up2, PartNumber=1, CopySource={"Bucket": b, "Key": "three.bin"},
                            CopySourceRange="bytes=%d-%d" % (b1 - 1000, b2 + 999))
    s3.complete_multipart_upload(Bucket=b, Key="pc.bin", UploadId=up2,
                                 MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": r["CopyPartResult"]["ETag"]}]})
    check(s3.get_object(Bucket=b, Key="pc.bin")["Body"].read() == whole[b1 - 1000:b2 + 1000], "UploadPartCopy across part boundaries")
    # Completion conditions.
    up3 = s3.create_multipart_upload(Bucket=b, Key="three.bin")["UploadId"]
    p = s3.upload_part(Bucket=b, Key="three.bin", UploadId=up3, PartNumber=1, Body=b"replacement")
    parts = {"Parts": [{"PartNumber": 1, "ETag": p["ETag"]}]}
    check(error_code(lambda: s3.complete_multipart_upload(Bucket=b, Key="three.bin", UploadId=up3, MultipartUpload=parts,
          IfNoneMatch="*")) == "PreconditionFailed", "completion with If-None-Match: * on an existing key -> PreconditionFailed")
    check(error_code(lambda: s3.complete_multipart_upload(Bucket=b, Key="three.bin", UploadId=up3, MultipartUpload=parts,
          IfMatch='"0123456789abcdef0123456789abcdef"')) == "PreconditionFailed", "completion with a wrong If-Match -> PreconditionFailed")
    check(s3.get_object(Bucket=b, Key="three.bin")["Body"].read() == whole, "refused completions changed nothing")
    check(len(s3.list_parts(Bucket=b, Key="three.bin", UploadId=up3)["Parts"]) == 1, "the refused upload is still there")
    print("MPREF %s %s %d %s %s" % (b, up, len(whole), up3, want))
    print("MULTIPART REF CHECKS PASSED")
    sys.exit(0)

if mode == "multipart-ref-replace":
    up3, want = sys.argv[5], sys.argv[6]
    parts = {"Parts": [{"PartNumber": 1, "ETag": '"%s"' % hashlib.md5(b"replacement").hexdigest()}]}
    s3.complete_multipart_upload(Bucket="mp-ref", Key="three.bin", UploadId=up3, MultipartUpload=parts, IfMatch='"%s"' % want)
    check(s3.get_object(Bucket="mp-ref", Key="three.bin")["Body"].read() == b"replacement",
          "completion with the matching If-Match replaces the object")
    print("MULTIPART REPLACE CHECKS PASSED")
    sys.exit(0)

if mode == "grants-full":
    names = [b["Name"] for b in s3.list_buckets()["Buckets"]]
    check(names == ["app-data", "secret-backups", "shared-docs"], "a key without grants lists every bucket (got %r)" % names)
    check(s3.get_object(Bucket="secret-backups", Key="db.sqlite")["Body"].read() == b"backup", "and reads every bucket")
    check(s3.get_object(Bucket="app-data", Key="mp.bin")["Body"].read() == b"multi", "including the restricted key's")
    s3.put_object(Bucket="shared-docs", Key="new.txt", Body=b"x")
    check(error_code(lambda: s3.head_object(Bucket="secret-backups", Key="evil")) == "404", "the refused PUT stored nothing")
    print("GRANTS FULL CHECKS PASSED")
    sys.exit(0)

check(mode == "all", "mode is all, expiry-start, expiry-gone, grants-restricted or grants-full (got %r)" % mode)
bucket = "boto-bucket"
s3.create_bucket(Bucket=bucket)
check(bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]], "bucket listed")
check(error_code(lambda: s3.create_bucket(Bucket=bucket)) == "BucketAlreadyOwnedByYou", "create twice -> BucketAlreadyOwnedByYou")
check(error_code(lambda: s3.create_bucket(Bucket="Bad_Bucket")) == "InvalidBucketName", "bad name -> InvalidBucketName")

small = b"hello from boto3"
r = s3.put_object(Bucket=bucket, Key="small.txt", Body=small, ContentType="text/plain", Metadata={"colour": "blue"})
check(r["ETag"] == '"%s"' % hashlib.md5(small).hexdigest(), "small PUT ETag is the MD5")
got = s3.get_object(Bucket=bucket, Key="small.txt")
check(got["Body"].read() == small, "small GET")
check(got["ContentType"] == "text/plain", "content type kept")
check(got["Metadata"].get("colour") == "blue", "user metadata kept")
check(error_code(lambda: s3.put_object(Bucket=bucket, Key="bad-crc", Body=b"abc", ChecksumCRC32="AAAAAA==")) == "BadDigest", "wrong x-amz-checksum-crc32 -> BadDigest")
check(error_code(lambda: s3.head_object(Bucket=bucket, Key="bad-crc")) == "404", "BadDigest stored nothing")

# Digests: Content-MD5 and every x-amz-checksum-* a client sends are checked.
import base64
b64 = lambda d: base64.b64encode(d).decode()
check(error_code(lambda: s3.put_object(Bucket=bucket, Key="bad-md5", Body=b"abc", ContentMD5=b64(hashlib.md5(b"abd").digest()))) == "BadDigest", "wrong Content-MD5 -> BadDigest")
check(error_code(lambda: s3.put_object(Bucket=bucket, Key="bad-md5", Body=b"abc", ContentMD5="not-base64!")) == "InvalidDigest", "malformed Content-MD5 -> InvalidDigest")
s3.put_object(Bucket=bucket, Key="good-md5", Body=b"abc", ContentMD5=b64(hashlib.md5(b"abc").digest()))
check(s3.get_object(Bucket=bucket, Key="good-md5")["Body"].read() == b"abc", "right Content-MD5 stored")
for alg, arg, fn in [("sha256", "ChecksumSHA256", hashlib.sha256), ("sha1", "ChecksumSHA1", hashlib.sha1)]:
    check(error_code(lambda: s3.put_object(Bucket=bucket, Key="bad-" + alg, Body=b"abc", **{arg: b64(fn(b"abd").digest())})) == "BadDigest", "wrong x-amz-checksum-%s -> BadDigest" % alg)
    s3.put_object(Bucket=bucket, Key="good-" + alg, Body=b"abc", **{arg: b64(fn(b"abc").digest())})
    check(s3.get_object(Bucket=bucket, Key="good-" + alg)["Body"].read() == b"abc", "right x-amz-checksum-%s stored" % alg)
check(error_code(lambda: s3.head_object(Bucket=bucket, Key="bad-md5")) == "404", "BadDigest stored nothing (Content-MD5)")

# Conditional writes: create-only and compare-and-swap.
s3.put_object(Bucket=bucket, Key="lock", Body=b"first", IfNoneMatch="*")
check(error_code(lambda: s3.put_object(Bucket=bucket, Key="lock", Body=b"second", IfNoneMatch="*")) == "PreconditionFailed", "If-None-Match: * on an existing key -> PreconditionFailed")
check(s3.get_object(Bucket=bucket, Key="lock")["Body"].read() == b"first", "the create-only PUT left the object alone")
etag = s3.head_object(Bucket=bucket, Key="lock")["ETag"]
check(error_code(lambda: s3.put_object(Bucket=bucket, Key="lock", Body=b"x", IfMatch='"0123"')) == "PreconditionFailed", "If-Match with another ETag -> PreconditionFailed")
s3.put_object(Bucket=bucket, Key="lock", Body=b"third", IfMatch=etag)
check(s3.get_object(Bucket=bucket, Key="lock")["Body"].read() == b"third", "If-Match with the ETag replaced it")
check(error_code(lambda: s3.put_object(Bucket=bucket, Key="never-there", Body=b"x", IfMatch=etag)) == "NoSuchKey", "If-Match on a missing key -> NoSuchKey")

# Conditional reads: 304 and 412 as S3 answers them.
import datetime
etag = s3.head_object(Bucket=bucket, Key="lock")["ETag"]
later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)
earlier = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
check(error_code(lambda: s3.get_object(Bucket=bucket, Key="lock", IfNoneMatch=etag)) == "304", "GET If-None-Match the ETag -> 304")
check(error_code(lambda: s3.head_object(Bucket=bucket, Key="lock", IfNoneMatch=etag)) == "304", "HEAD If-None-Match the ETag -> 304")
check(s3.get_object(Bucket=bucket, Key="lock", IfNoneMatch='"other"')["Body"].read() == b"third", "GET If-None-Match another ETag -> 200")
check(error_code(lambda: s3.get_object(Bucket=bucket, Key="lock", IfMatch='"other"')) == "PreconditionFailed", "GET If-Match another ETag -> PreconditionFailed")
check(error_code(lambda: s3.head_object(Bucket=bucket, Key="lock", IfMatch='"other"')) == "412", "HEAD If-Match another ETag -> 412")
check(s3.get_object(Bucket=bucket, Key="lock", IfMatch=etag)["Body"].read() == b"third", "GET If-Match the ETag -> 200")
check(error_code(lambda: s3.get_object(Bucket=bucket, Key="lock", IfModifiedSince=later)) == "304", "GET If-Modified-Since tomorrow -> 304")
check(s3.get_object(Bucket=bucket, Key="lock", IfModifiedSince=earlier)["Body"].read() == b"third", "GET If-Modified-Since 2000 -> 200")
check(error_code(lambda: s3.get_object(Bucket=bucket, Key="lock", IfUnmodifiedSince=earlier)) == "PreconditionFailed", "GET If-Unmodified-Since 2000 -> PreconditionFailed")
check(s3.get_object(Bucket=bucket, Key="lock", IfMatch=etag, IfUnmodifiedSince=earlier)["Body"].read() == b"third", "If-Match wins over If-Unmodified-Since")
check(error_code(lambda: s3.get_object(Bucket=bucket, Key="lock", IfNoneMatch=etag, IfModifiedSince=earlier)) == "304", "If-None-Match wins over If-Modified-Since")

big = os.urandom(5 * 1024 * 1024 + 12345)
r = s3.put_object(Bucket=bucket, Key="dir/big.bin", Body=big)
check(r["ETag"] == '"%s"' % hashlib.md5(big).hexdigest(), "multi-MB PUT ETag is the MD5")
check(s3.get_object(Bucket=bucket, Key="dir/big.bin")["Body"].read() == big, "multi-MB GET")
rng = s3.get_object(Bucket=bucket, Key="dir/big.bin", Range="bytes=70000-200000")
check(rng["Body"].read() == big[70000:200001], "Range GET across chunks")
check(rng["ContentRange"] == "bytes 70000-200000/%d" % len(big), "Content-Range")
tail = s3.get_object(Bucket=bucket, Key="dir/big.bin", Range="bytes=-100")["Body"].read()
check(tail == big[-100:], "suffix Range GET")
check(error_code(lambda: s3.get_object(Bucket=bucket, Key="dir/big.bin", Range="bytes=%d-" % len(big))) == "InvalidRange", "Range past the end -> InvalidRange")
head = s3.head_object(Bucket=bucket, Key="dir/big.bin")
check(head["ContentLength"] == len(big), "HEAD length")
check(head["ETag"] == '"%s"' % hashlib.md5(big).hexdigest(), "HEAD ETag")
check(error_code(lambda: s3.head_object(Bucket=bucket, Key="missing")) == "404", "HEAD missing -> 404")
check(error_code(lambda: s3.get_object(Bucket=bucket, Key="missing")) == "NoSuchKey", "GET missing -> NoSuchKey")
check(error_code(lambda: s3.get_object(Bucket="no-such-bucket", Key="x")) == "NoSuchBucket", "GET in a missing bucket -> NoSuchBucket")

# Multipart through the transfer manager: 13 MiB in 5 MiB parts.
data = os.urandom(13 * 1024 * 1024 + 777)
with tempfile.NamedTemporaryFile(delete=False) as f:
    f.write(data)
    path = f.name
cfg = TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024, max_concurrency=2)
s3.upload_file(path, bucket, "dir/multi.bin", Config=cfg)
parts = [data[i:i + 5 * 1024 * 1024] for i in range(0, len(data), 5 * 1024 * 1024)]
want = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + "-%d" % len(parts)
head = s3.head_object(Bucket=bucket, Key="dir/multi.bin")
check(head["ETag"] == '"%s"' % want, "multipart ETag is md5(part md5s)-n (%s)" % want)
out = io.BytesIO()
s3.download_fileobj(bucket, "dir/multi.bin", out, Config=cfg)
check(out.getvalue() == data, "multipart object downloads intact (ranged, concurrent)")
os.unlink(path)

# Server-side copies.
r = s3.copy_object(Bucket=bucket, Key="copy.bin", CopySource={"Bucket": bucket, "Key": "dir/big.bin"})
check(r["CopyObjectResult"]["ETag"] == '"%s"' % hashlib.md5(big).hexdigest(), "CopyObject ETag")
check(s3.get_object(Bucket=bucket, Key="copy.bin")["Body"].read() == big, "CopyObject data")
s3.copy_object(Bucket=bucket, Key="copy-small.txt", CopySource=bucket + "/small.txt")
check(s3.head_object(Bucket=bucket, Key="copy-small.txt")["Metadata"].get("colour") == "blue", "CopyObject keeps metadata")
s3.copy_object(Bucket=bucket, Key="copy-small.txt", CopySource=bucket + "/small.txt", MetadataDirective="REPLACE",
               Metadata={"colour": "red"}, ContentType="text/x-copy")
h = s3.head_object(Bucket=bucket, Key="copy-small.txt")
check(h["Metadata"].get("colour") == "red" and h["ContentType"] == "text/x-copy", "CopyObject REPLACE metadata")
check(error_code(lambda: s3.copy_object(Bucket=bucket, Key="c", CopySource=bucket + "/missing")) == "NoSuchKey", "copy of a missing key -> NoSuchKey")

# Low-level multipart errors.
up = s3.create_multipart_upload(Bucket=bucket, Key="aborted")
p1 = s3.upload_part(Bucket=bucket, Key="aborted", UploadId=up["UploadId"], PartNumber=1, Body=b"x" * 100)
check(error_code(lambda: s3.complete_multipart_upload(Bucket=bucket, Key="aborted", UploadId=up["UploadId"],
      MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": '"00000000000000000000000000000000"'}]})) == "InvalidPart", "wrong part ETag -> InvalidPart")
s3.abort_multipart_upload(Bucket=bucket, Key="aborted", UploadId=up["UploadId"])
check(error_code(lambda: s3.upload_part(Bucket=bucket, Key="aborted", UploadId=up["UploadId"], PartNumber=2, Body=b"y")) == "NoSuchUpload", "part after abort -> NoSuchUpload")

# Uploads killed part-way: found with ListMultipartUploads and ListParts,
# then aborted, the way cleanup scripts and `aws s3api` do it.
import datetime as _dt
started = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=5)
odd = "killed/ü & <x>.bin"
ka = [s3.create_multipart_upload(Bucket=bucket, Key="killed/a.bin")["UploadId"] for _ in range(2)]
kb = s3.create_multipart_upload(Bucket=bucket, Key=odd)["UploadId"]
other = s3.create_multipart_upload(Bucket=bucket, Key="other.bin")["UploadId"]
sent = {}
for n, size in [(3, 1000), (1, 5 * MiB), (2, 5 * MiB)]:
    body = os.urandom(size)
    r = s3.upload_part(Bucket=bucket, Key="killed/a.bin", UploadId=ka[0], PartNumber=n, Body=body)
    sent[n] = (r["ETag"], size)
    check(r["ETag"] == '"%s"' % hashlib.md5(body).hexdigest(), "UploadPart %d ETag is the MD5" % n)
r = s3.list_multipart_uploads(Bucket=bucket, Prefix="killed/")
want = sorted([("killed/a.bin", u) for u in ka] + [(odd, kb)])
check(sorted((u["Key"], u["UploadId"]) for u in r["Uploads"]) == want, "ListMultipartUploads with a prefix lists the three killed uploads")
check(not r["IsTruncated"] and r["Bucket"] == bucket, "ListMultipartUploads: not truncated, bucket named")
check(all(u["Initiated"] > started for u in r["Uploads"]), "ListMultipartUploads: Initiated times are now")
check([(u["Key"], u["UploadId"]) for u in r["Uploads"]] == want, "ListMultipartUploads: ordered by key, then upload id")
pages, seen = 0, []
for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, PaginationConfig={"PageSize": 1}):
    pages += 1
    seen += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", [])]
check(seen == sorted(want + [("other.bin", other)]) and pages >= 4, "ListMultipartUploads pages one at a time with KeyMarker/UploadIdMarker (%d pages)" % pages)
r = s3.list_multipart_uploads(Bucket=bucket, MaxUploads=2)
check(r["IsTruncated"] and len(r["Uploads"]) == 2 and r["NextKeyMarker"] == "killed/a.bin", "MaxUploads=2 -> truncated, NextKeyMarker")
r = s3.list_parts(Bucket=bucket, Key="killed/a.bin", UploadId=ka[0])
check([p["PartNumber"] for p in r["Parts"]] == [1, 2, 3], "ListParts lists parts 1, 2, 3 in order")
check(all((p["ETag"], p["Size"]) == sent[p["PartNumber"]] for p in r["Parts"]), "ListParts: ETag and Size of each part")
check(all(p["LastModified"] > started for p in r["Parts"]) and not r["IsTruncated"], "ListParts: LastModified, not truncated")
pages, nums = 0, []
for page in s3.get_paginator("list_parts").paginate(Bucket=bucket, Key="killed/a.bin", UploadId=ka[0], PaginationConfig={"PageSize": 2}):
    pages += 1
    nums += [p["PartNumber"] for p in page.get("Parts", [])]
check(nums == [1, 2, 3] and pages == 2, "ListParts pages with MaxParts/PartNumberMarker")
r = s3.list_parts(Bucket=bucket, Key="killed/a.bin", UploadId=ka[0], PartNumberMarker=1, MaxParts=1)
check([p["PartNumber"] for p in r["Parts"]] == [2] and r["IsTruncated"] and r["NextPartNumberMarker"] == 2, "ListParts after part 1, one part")
check("Parts" not in s3.list_parts(Bucket=bucket, Key="killed/a.bin", UploadId=ka[1]), "ListParts of an upload without parts")
check(error_code(lambda: s3.list_parts(Bucket=bucket, Key="other.bin", UploadId=ka[0])) == "NoSuchUpload", "ListParts under another key -> NoSuchUpload")
check(error_code(lambda: s3.list_multipart_uploads(Bucket="no-such-bucket")) == "NoSuchBucket", "ListMultipartUploads of a missing bucket -> NoSuchBucket")
for u in s3.list_multipart_uploads(Bucket=bucket, Prefix="killed/")["Uploads"]:
    s3.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
check("Uploads" not in s3.list_multipart_uploads(Bucket=bucket, Prefix="killed/"), "found and aborted: none left under killed/")
check(error_code(lambda: s3.list_parts(Bucket=bucket, Key="killed/a.bin", UploadId=ka[0])) == "NoSuchUpload", "ListParts after abort -> NoSuchUpload")
s3.abort_multipart_upload(Bucket=bucket, Key="other.bin", UploadId=other)

# UploadPartCopy: an object over 8 MiB copied to another bucket in ranged
# parts (what `aws s3 cp s3://a/big s3://b/big` does), then completed.
src = os.urandom(12 * MiB + 333)
s3.put_object(Bucket=bucket, Key="copy-src.bin", Body=src)
dest = "boto-copy-dest"
s3.create_bucket(Bucket=dest)
up = s3.create_multipart_upload(Bucket=dest, Key="big copy.bin")["UploadId"]
cs = {"Bucket": bucket, "Key": "copy-src.bin"}
ranges = [(0, 5 * MiB - 1), (5 * MiB, 10 * MiB - 1), (10 * MiB, len(src) - 1)]
done = []
for i, (a, b) in enumerate(ranges):
    r = s3.upload_part_copy(Bucket=dest, Key="big copy.bin", UploadId=up, PartNumber=i + 1, CopySource=cs,
                            CopySourceRange="bytes=%d-%d" % (a, b))
    etag = r["CopyPartResult"]["ETag"]
    check(etag == '"%s"' % hashlib.md5(src[a:b + 1]).hexdigest(), "UploadPartCopy part %d ETag is the MD5 of its range" % (i + 1))
    check(r["CopyPartResult"]["LastModified"] > started, "UploadPartCopy part %d LastModified" % (i + 1))
    done.append({"PartNumber": i + 1, "ETag": etag})
r = s3.list_parts(Bucket=dest, Key="big copy.bin", UploadId=up)
check([p["Size"] for p in r["Parts"]] == [b - a + 1 for a, b in ranges], "ListParts shows the copied part sizes")
r = s3.complete_multipart_upload(Bucket=dest, Key="big copy.bin", UploadId=up, MultipartUpload={"Parts": done})
want = hashlib.md5(b"".join(hashlib.md5(src[a:b + 1]).digest() for a, b in ranges)).hexdigest() + "-3"
check(r["ETag"] == '"%s"' % want, "the copied object's ETag is md5(part md5s)-3")
check(s3.get_object(Bucket=dest, Key="big copy.bin")["Body"].read() == src, "the copied object has the source's bytes")
# A whole small object as a part (no range), and the errors.
up = s3.create_multipart_upload(Bucket=dest, Key="whole")["UploadId"]
r = s3.upload_part_copy(Bucket=dest, Key="whole", UploadId=up, PartNumber=1, CopySource={"Bucket": bucket, "Key": "good-md5"})
check(r["CopyPartResult"]["ETag"] == '"%s"' % hashlib.md5(b"abc").hexdigest(), "UploadPartCopy without a range copies the whole object")
s3.complete_multipart_upload(Bucket=dest, Key="whole", UploadId=up, MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": r["CopyPartResult"]["ETag"]}]})
check(s3.get_object(Bucket=dest, Key="whole")["Body"].read() == b"abc", "single copied part completes")
up = s3.create_multipart_upload(Bucket=dest, Key="errors")["UploadId"]
upc = lambda **kw: (lambda: s3.upload_part_copy(**{**dict(Bucket=dest, Key="errors", UploadId=up, PartNumber=1, CopySource=cs), **kw}))
check(error_code(upc(CopySource={"Bucket": bucket, "Key": "missing"})) == "NoSuchKey", "UploadPartCopy of a missing key -> NoSuchKey")
check(error_code(upc(CopySource={"Bucket": "no-such-bucket", "Key": "x"})) == "NoSuchBucket", "UploadPartCopy from a missing bucket -> NoSuchBucket")
check(error_code(upc(CopySourceRange="bytes=0-%d" % len(src))) == "InvalidRange", "UploadPartCopy range past the end -> InvalidRange")
check(error_code(upc(CopySourceRange="bytes=100-")) == "InvalidArgument", "UploadPartCopy open-ended range -> InvalidArgument")
check(error_code(upc(UploadId="0123")) == "NoSuchUpload", "UploadPartCopy to a missing upload -> NoSuchUpload")
check(error_code(upc(PartNumber=10001)) == "InvalidArgument", "UploadPartCopy part 10001 -> InvalidArgument")
check(error_code(upc(CopySourceIfMatch='"0123"')) == "PreconditionFailed", "UploadPartCopy x-amz-copy-source-if-match another ETag -> PreconditionFailed")
check(error_code(upc(CopySourceIfNoneMatch='"%s"' % hashlib.md5(src).hexdigest())) == "PreconditionFailed", "UploadPartCopy x-amz-copy-source-if-none-match its ETag -> PreconditionFailed")
check(error_code(lambda: s3.copy_object(Bucket=dest, Key="c", CopySource=cs, CopySourceIfMatch='"0123"')) == "PreconditionFailed", "CopyObject x-amz-copy-source-if-match another ETag -> PreconditionFailed")
check("Parts" not in s3.list_parts(Bucket=dest, Key="errors", UploadId=up), "refused part copies stored no part")
s3.abort_multipart_upload(Bucket=dest, Key="errors", UploadId=up)
s3.delete_objects(Bucket=dest, Delete={"Objects": [{"Key": "big copy.bin"}, {"Key": "whole"}]})
s3.delete_bucket(Bucket=dest)

# Listing: prefix, delimiter, pagination.
for i in range(7):
    s3.put_object(Bucket=bucket, Key="list/%02d" % i, Body=b"%d" % i)
s3.put_object(Bucket=bucket, Key="list/sub/a", Body=b"a")
s3.put_object(Bucket=bucket, Key="list/sub/b", Body=b"b")
r = s3.list_objects_v2(Bucket=bucket, Prefix="list/", Delimiter="/")
check([o["Key"] for o in r["Contents"]] == ["list/%02d" % i for i in range(7)], "v2 prefix+delimiter keys")
check([p["Prefix"] for p in r.get("CommonPrefixes", [])] == ["list/sub/"], "v2 common prefixes")
keys = []
pages = 0
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="list/", PaginationConfig={"PageSize": 3}):
    pages += 1
    keys += [o["Key"] for o in page.get("Contents", [])]
check(pages == 3 and len(keys) == 9, "v2 pagination: 9 keys in 3 pages (got %d in %d)" % (len(keys), pages))
check(keys == sorted(keys), "v2 pagination keeps order")
keys = []
for page in s3.get_paginator("list_objects").paginate(Bucket=bucket, Prefix="list/", PaginationConfig={"PageSize": 4}):
    keys += [o["Key"] for o in page.get("Contents", [])]
check(len(keys) == 9, "v1 pagination")
r = s3.list_objects_v2(Bucket=bucket)
etags = {o["Key"]: o["ETag"] for o in r["Contents"]}
check(etags["small.txt"] == '"%s"' % hashlib.md5(small).hexdigest(), "listing ETag")
weird = "odd key/ü & <x> %20+?=.txt"
s3.put_object(Bucket=bucket, Key=weird, Body=b"w")
check(s3.get_object(Bucket=bucket, Key=weird)["Body"].read() == b"w", "key with spaces, unicode and reserved characters")
check(weird in [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="odd")["Contents"]], "listing decodes url-encoded keys")

# Presigned GET with plain urllib.
import urllib.request
url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "small.txt"}, ExpiresIn=300)
check(urllib.request.urlopen(url).read() == small, "presigned GET")

# A Signature Version 2 presigned URL is refused with the reason, not "not signed".
import urllib.error
v2 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                  region_name="us-east-1", config=Config(signature_version="s3", s3={"addressing_style": "path"}))
url2 = v2.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "lock"}, ExpiresIn=300)
try:
    urllib.request.urlopen(url2).read()
    check(False, "a SigV2 presigned URL is refused")
except urllib.error.HTTPError as e:
    text = e.read().decode()
    check(e.code == 400 and "<Code>InvalidRequest</Code>" in text and "Signature Version 4" in text,
          "SigV2 presigned URL -> 400 InvalidRequest naming Signature Version 4 (%d %s)" % (e.code, text[:200]))

# Wrong secret.
bad = client(secret="not-the-right-secret")
check(error_code(lambda: bad.list_objects_v2(Bucket=bucket)) == "SignatureDoesNotMatch", "wrong secret -> SignatureDoesNotMatch")
check(error_code(lambda: bad.put_object(Bucket=bucket, Key="evil", Body=b"x" * 2000)) == "SignatureDoesNotMatch", "wrong secret PUT -> SignatureDoesNotMatch")
check(error_code(lambda: s3.head_object(Bucket=bucket, Key="evil")) == "404", "refused PUT stored nothing")

# Deletes.
check(error_code(lambda: s3.delete_bucket(Bucket=bucket)) == "BucketNotEmpty", "delete non-empty bucket -> BucketNotEmpty")
s3.delete_object(Bucket=bucket, Key="small.txt")
check(error_code(lambda: s3.get_object(Bucket=bucket, Key="small.txt")) == "NoSuchKey", "deleted object is gone")
r = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": o["Key"]} for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]})
check(len(r.get("Deleted", [])) >= 10, "DeleteObjects")
check(s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0, "bucket empty")
s3.delete_bucket(Bucket=bucket)
check(error_code(lambda: s3.head_bucket(Bucket=bucket)) == "404", "bucket deleted")
print("ALL BOTO3 CHECKS PASSED")
