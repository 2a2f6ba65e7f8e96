/**
 * Signed documents, JWS done with node:crypto: interoperable with jose
 * both ways (jose was the implementation before; documents it signed sit in
 * registries and must still verify), the same wire form byte for byte
 * except the (randomised) ECDSA signature, and every refusal of a JWS knit
 * did not write. jose is a devDependency for this test only: the runtime
 * never imports it.
 */
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import { createPrivateKey, X509Certificate } from 'node:crypto';
import { CompactSign, compactVerify, decodeProtectedHeader } from 'jose';
import { signDocument, verifyDocument, type SignerMaterial } from './signed-doc.js';
import { CertificateAuthority, importKeyPair } from './ca.js';
import { createCsr } from './csr.js';
import { serverId } from './spiffe.js';
import { isKnitError } from '../errors.js';
import { signers } from '../../test/helpers/signer.js';

const TD = 'doc.knit';
let ca: CertificateAuthority;
let server: SignerMaterial;
let serverKeyPem: string;
const trust = () => ({ roots: [ca.rootPem], trustDomain: TD });

/** Signs as the old code did: jose's CompactSign with the same header and payload. */
async function signWithJose(kind: string, seq: number, body: unknown, now = new Date(), header: Record<string, unknown> = {}): Promise<string> {
  const x5c = server.chainPem.map((pem) => new X509Certificate(pem).raw.toString('base64'));
  const payload = { kind, td: TD, seq, iat: now.getTime(), body };
  return new CompactSign(new TextEncoder().encode(JSON.stringify(payload)))
    .setProtectedHeader({ alg: 'ES256', typ: 'knit-doc+jws', x5c, ...header })
    .sign((await importKeyPair(serverKeyPem)).keys.privateKey);
}

before(async () => {
  ca = await CertificateAuthority.create(TD);
  const id = serverId(TD, 'cp1');
  const { keyPem, csrPem } = await createCsr(id);
  const leaf = await ca.signCsr(csrPem, id);
  serverKeyPem = keyPem;
  server = { chainPem: [leaf.certPem], privateKey: createPrivateKey(keyPem) };
});

test('a document jose signed verifies here', async () => {
  const jws = await signWithJose('intentions', 7, { default: 'deny', intentions: [{ a: 'ü' }] });
  const v = await verifyDocument<{ default: string }>(jws, 'intentions', trust());
  assert.deepEqual([v.kind, v.seq, v.body, v.signer], ['intentions', 7, { default: 'deny', intentions: [{ a: 'ü' }] }, `spiffe://${TD}/server/cp1`]);
});

test('a document signed here verifies with jose, and reads exactly as jose would have written it', async () => {
  const now = new Date();
  const body = { nodes: ['n1'], note: 'ünïcode and "quotes"' };
  const ours = await signDocument(server, TD, 'nodes', 3, body, now);
  const { payload, protectedHeader } = await compactVerify(ours, new X509Certificate(server.chainPem[0]!).publicKey, { algorithms: ['ES256'] });
  assert.deepEqual(JSON.parse(new TextDecoder().decode(payload)), { kind: 'nodes', td: TD, seq: 3, iat: now.getTime(), body });
  assert.deepEqual(protectedHeader, decodeProtectedHeader(ours));
  assert.deepEqual(Object.keys(protectedHeader), ['alg', 'typ', 'x5c']);
  // Header and payload byte for byte; only the ECDSA signature (random k) differs.
  const theirs = await signWithJose('nodes', 3, body, now);
  const [h1, p1, s1] = ours.split('.');
  const [h2, p2, s2] = theirs.split('.');
  assert.equal(h1, h2);
  assert.equal(p1, p2);
  assert.equal(Buffer.from(s1!, 'base64url').length, 64);
  assert.equal(Buffer.from(s2!, 'base64url').length, 64);
  // A WebCrypto key (as the control plane holds its signer key) signs the same way.
  const viaCryptoKey = await signDocument({ ...server, privateKey: (await importKeyPair(serverKeyPem)).keys.privateKey }, TD, 'nodes', 3, body, now);
  assert.equal(viaCryptoKey.split('.').slice(0, 2).join('.'), `${h1}.${p1}`);
  await compactVerify(viaCryptoKey, new X509Certificate(server.chainPem[0]!).publicKey);
});

test('a JWS knit did not write is refused, naming why', async () => {
  const good = await signDocument(server, TD, 'intentions', 1, { x: 1 });
  const [h, p, s] = good.split('.') as [string, string, string];
  const header = JSON.parse(Buffer.from(h, 'base64url').toString()) as Record<string, unknown>;
  const withHeader = (over: Record<string, unknown>) => `${Buffer.from(JSON.stringify({ ...header, ...over })).toString('base64url')}.${p}.${s}`;
  const refused = async (jws: string, re: RegExp) =>
    assert.rejects(verifyDocument(jws, 'intentions', trust()), (e: unknown) => isKnitError(e, 'KNIT_ERR_SIGNATURE') && re.test(e.message), String(re));

  await refused(`${h}.${p}`, /not a signed document/);
  await refused(`${h}.${p}.${s}.x`, /not a signed document/);
  await refused(`!!.${p}.${s}`, /unreadable JWS header: header is not base64url/);
  await refused(`${Buffer.from('[1]').toString('base64url')}.${p}.${s}`, /unreadable JWS header: .*not a JSON object/);
  await refused(`${Buffer.from('{"alg":').toString('base64url')}.${p}.${s}`, /unreadable JWS header/);
  await refused(withHeader({ alg: 'none' }), /algorithm none is not ES256/);
  await refused(withHeader({ alg: 'ES384' }), /algorithm ES384 is not ES256/);
  await refused(withHeader({ alg: 'HS256' }), /algorithm HS256 is not ES256/);
  await refused(withHeader({ crit: ['exp'] }), /crit\/b64/);
  await refused(withHeader({ b64: false }), /crit\/b64/);
  await refused(withHeader({ x5c: [] }), /no signer certificate chain/);
  await refused(withHeader({ x5c: 'abc' }), /no signer certificate chain/);
  await refused(withHeader({ x5c: ['not base64!'] }), /signer certificate cannot be parsed: x5c entry is not base64/);
  await refused(withHeader({ x5c: [Buffer.from('junk').toString('base64')] }), /signer certificate cannot be parsed/);
  // The header changed under the signature: it is part of the signed input.
  await refused(withHeader({ typ: 'other' }), /signature does not verify/);
  // Signature: not base64url, the wrong length (DER instead of R || S), flipped, empty.
  await refused(`${h}.${p}.${s.slice(0, -2)}+/`, /signature is not base64url/);
  await refused(`${h}.${p}.${s} `, /signature is not base64url/);
  await refused(`${h}.${p}.${Buffer.from(s, 'base64url').subarray(0, 63).toString('base64url')}`, /ES256 signature is 64 bytes, this one 63/);
  const flipped = Buffer.from(s, 'base64url');
  flipped[10]! ^= 1;
  await refused(`${h}.${p}.${flipped.toString('base64url')}`, /signature does not verify: signature verification failed/);
  await refused(`${h}.${p}.`, /64 bytes, this one 0/);
  // A payload that is not JSON, or not an object, under a valid signature, cannot be made without the key; an altered one fails the signature.
  await refused(`${h}.${Buffer.from('{"kind":"intentions"}').toString('base64url')}.${s}`, /signature does not verify/);
});

test('the signer checks are kept: control-plane identity, trust domain, chain, validity at iat, leaf shape', async () => {
  const s = await signers(ca);
  const refused = async (jws: string, re: RegExp, t = trust()) =>
    assert.rejects(verifyDocument(jws, 'intentions', t), (e: unknown) => isKnitError(e, 'KNIT_ERR_SIGNATURE') && re.test(e.message), String(re));
  await refused(await signDocument(s.agent, TD, 'intentions', 1, {}), /not a control-plane identity/);
  await refused(await signDocument(s.otherCa, TD, 'intentions', 1, {}), /does not chain to this agent's trust bundle/);
  await refused(await signDocument(server, 'other.knit', 'intentions', 1, {}), /for trust domain other\.knit/);
  await refused(await signDocument(server, TD, 'nodes', 1, {}), /is a signed "nodes", not "intentions"/);
  await refused(await signDocument(server, TD, 'intentions', -1, {}), /lacks seq\/iat/);
  await refused(await signDocument(server, TD, 'intentions', 1, {}, new Date(Date.now() + 3600_000)), /signed in the future/);
  await refused(await signDocument(server, TD, 'intentions', 1, {}, new Date(Date.now() - 3 * 24 * 3600_000)), /was not valid when the document was signed/);
  // A CA certificate as the signer (the root has the trust domain's ID, not a server's).
  const rootSigned = `${Buffer.from(JSON.stringify({ alg: 'ES256', typ: 'knit-doc+jws', x5c: [new X509Certificate(ca.rootPem).raw.toString('base64')] })).toString('base64url')}.e30.${'A'.repeat(86)}`;
  await refused(rootSigned, /exactly one SPIFFE ID|not a control-plane identity/);
  // signDocument refuses a key ES256 cannot use.
  const { privateKey } = await import('node:crypto').then((c) => c.generateKeyPairSync('ec', { namedCurve: 'secp384r1' }));
  await assert.rejects(signDocument({ chainPem: server.chainPem, privateKey }, TD, 'intentions', 1, {}), (e: unknown) => isKnitError(e, 'KNIT_ERR_SIGNATURE') && /EC P-256/.test(e.message));
});
