/**
 * The DER reader and writer on their own, and on certificates crafted byte
 * by byte (signed with node:crypto so OpenSSL parses them) to reach what
 * neither openssl's command line nor knit's CA would write: an extension
 * twice, cA=TRUE without keyCertSign, a URI SAN that reads like two,
 * GeneralizedTime, no extensions at all. x509.test.ts checks the same
 * reader against certificates made by openssl and by knit's CA.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { generateKeyPairSync, sign, X509Certificate } from 'node:crypto';
import {
  parse, children, oid, time, boolean, bitString, readKeyUsage, readCertificate, readSubjectAltName, readBasicConstraints, nameToString,
  objectIdentifier, sequence, setOf, octetString, bitStringOf, utf8String, contextTag, smallInteger, tlv, toPem, OID, TAG, UNIVERSAL, CONTEXT,
} from './der.js';
import { certInfoFromDer } from './x509.js';
import { isKnitError } from '../errors.js';

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s/g, ''), 'hex');
const malformed = (fn: () => unknown, re: RegExp): void => assert.throws(fn, (e: unknown) => isKnitError(e, 'KNIT_ERR_CERT') && re.test(e.message), String(re));

test('the reader takes DER and refuses BER and broken encodings', () => {
  const el = parse(hex('30 06 02 01 05 04 01 ff'));
  assert.equal(el.num, TAG.SEQUENCE);
  assert.deepEqual(children(el).map((c) => [c.num, c.value.toString('hex')]), [[TAG.INTEGER, '05'], [TAG.OCTET_STRING, 'ff']]);
  // Long-form length, minimal.
  const long = parse(Buffer.concat([hex('04 81 80'), Buffer.alloc(128)]));
  assert.equal(long.value.length, 128);
  // High tag number form: [31] is the first number that needs it.
  assert.equal(parse(hex('9f 1f 00')).num, 31);

  malformed(() => parse(hex('30 80 00 00')), /indefinite length/);
  malformed(() => parse(hex('04 81 01 00')), /non-minimal length/);
  malformed(() => parse(hex('04 82 00 01 00')), /non-minimal length/);
  malformed(() => parse(hex('05 00 00')), /1 trailing bytes/);
  malformed(() => parse(hex('04 05 00')), /runs past its container/);
  malformed(() => parse(hex('04 85 01 00 00 00 00')), /length too large/);
  malformed(() => parse(hex('9f 1e 00')), /non-minimal tag number/);
  malformed(() => parse(hex('')), /truncated/);
  // A child running past its parent, though the buffer goes on.
  malformed(() => children(parse(hex('30 03 04 03 00'))), /runs past its container/);
  malformed(() => children(parse(hex('04 01 00'))), /constructed/);
});

test('OBJECT IDENTIFIERs read and write the same', () => {
  assert.equal(objectIdentifier('1.2.840.10045.4.3.2').toString('hex'), '06082a8648ce3d040302');
  for (const o of ['1.2.840.10045.4.3.2', '2.5.29.17', '0.9.2342.19200300.100.1.25', '2.999.3', '1.3.6.1.5.5.7.3.1', '1.2.840.113549.1.9.14']) {
    assert.equal(oid(parse(objectIdentifier(o))), o);
  }
  malformed(() => oid(parse(hex('06 03 2a 80 01'))), /non-minimal/);
  malformed(() => oid(parse(hex('06 02 2a 86'))), /ends inside/);
  malformed(() => oid(parse(hex('06 00'))), /empty/);
  assert.throws(() => objectIdentifier('3.1'), RangeError);
  assert.throws(() => objectIdentifier('1.40'), RangeError);
});

test('times are RFC 5280 UTCTime or GeneralizedTime, in UTC, whole seconds, real dates', () => {
  const utc = (s: string) => tlv(UNIVERSAL, false, TAG.UTC_TIME, Buffer.from(s));
  const gen = (s: string) => tlv(UNIVERSAL, false, TAG.GENERALIZED_TIME, Buffer.from(s));
  assert.equal(time(parse(utc('491231235959Z'))).toISOString(), '2049-12-31T23:59:59.000Z');
  assert.equal(time(parse(utc('500101000000Z'))).toISOString(), '1950-01-01T00:00:00.000Z');
  assert.equal(time(parse(gen('20510630120000Z'))).toISOString(), '2051-06-30T12:00:00.000Z');
  malformed(() => time(parse(gen('20510630120000.5Z'))), /not an RFC 5280 time/);
  malformed(() => time(parse(utc('5001010000Z'))), /not an RFC 5280 time/);
  malformed(() => time(parse(utc('500101000000+0100'))), /not an RFC 5280 time/);
  malformed(() => time(parse(utc('500230000000Z'))), /not a real time/);
  malformed(() => time(parse(utc('500101250000Z'))), /not a real time/);
  malformed(() => time(parse(gen('491231235959Z'))), /not an RFC 5280 time/);
});

test('BOOLEAN, BIT STRING and KeyUsage bits', () => {
  assert.equal(boolean(parse(hex('01 01 ff'))), true);
  assert.equal(boolean(parse(hex('01 01 00'))), false);
  malformed(() => boolean(parse(hex('01 01 01'))), /0x00 or 0xff/);
  assert.deepEqual(readKeyUsage(hex('03 02 07 80')), ['digitalSignature']);
  assert.deepEqual(readKeyUsage(hex('03 02 01 86')), ['digitalSignature', 'keyCertSign', 'cRLSign']);
  assert.deepEqual(readKeyUsage(hex('03 02 03 08')), ['keyAgreement']);
  // decipherOnly is bit 8: the second byte.
  assert.deepEqual(readKeyUsage(hex('03 03 07 00 80')), ['decipherOnly']);
  assert.deepEqual(readKeyUsage(hex('03 01 00')), []);
  malformed(() => bitString(parse(hex('03 02 07 81'))), /unused bits set/);
  malformed(() => bitString(parse(hex('03 02 08 00'))), /unused-bits count/);
  malformed(() => bitString(parse(hex('03 01 01'))), /unused-bits count/);
});

test('the writer builds what the reader reads: SET OF sorted, small INTEGERs, PEM', () => {
  assert.equal(smallInteger(0).toString('hex'), '020100');
  assert.equal(smallInteger(128).toString('hex'), '02020080');
  assert.equal(setOf(hex('04 01 02'), hex('04 01 01')).toString('hex'), '3106040101040102');
  const s = sequence(utf8String('web'), octetString(Buffer.alloc(200)), bitStringOf(hex('aa')), contextTag(6, false, Buffer.from('spiffe://x')));
  const parts = children(parse(s));
  assert.deepEqual(parts.map((p) => [p.cls, p.num, p.value.length]), [[UNIVERSAL, TAG.UTF8_STRING, 3], [UNIVERSAL, TAG.OCTET_STRING, 200], [UNIVERSAL, TAG.BIT_STRING, 2], [CONTEXT, 6, 10]]);
  const pem = toPem(Buffer.alloc(100, 1), 'CERTIFICATE');
  assert.match(pem, /^-----BEGIN CERTIFICATE-----\n([A-Za-z0-9+/]{64}\n){2}[A-Za-z0-9+/]{6}==\n-----END CERTIFICATE-----$/);
  const der = craft();
  assert.deepEqual(new X509Certificate(toPem(der, 'CERTIFICATE')).raw, der, 'OpenSSL reads the PEM back to the same DER');
});

test('names read as @peculiar/x509 printed them, escaped', () => {
  const atv = (o: string, v: Buffer) => setOf(sequence(objectIdentifier(o), v));
  const printable = (s: string) => tlv(UNIVERSAL, false, TAG.PRINTABLE_STRING, Buffer.from(s));
  const bmp = (s: string) => tlv(UNIVERSAL, false, TAG.BMP_STRING, Buffer.from(s, 'utf16le').swap16());
  const name = sequence(atv('2.5.4.3', utf8String('a, b+"c"')), atv('2.5.4.10', printable('knit')), atv('2.5.4.11', bmp('ünit')), atv('1.2.3.4', tlv(UNIVERSAL, false, TAG.INTEGER, hex('05'))));
  assert.equal(nameToString(parse(name)), 'CN=a\\, b\\+\\"c\\", O=knit, OU=ünit, 1.2.3.4=#020105');
  const multi = sequence(setOf(sequence(objectIdentifier('2.5.4.3'), utf8String('x')), sequence(objectIdentifier('2.5.4.10'), utf8String('y'))));
  assert.match(nameToString(parse(multi)), /^(CN=x\+O=y|O=y\+CN=x)$/);
  assert.equal(nameToString(parse(sequence())), '');
});

// ---------------------------------------------------------------------------
// Certificates crafted byte by byte.

const signer = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
const spki = signer.publicKey.export({ type: 'spki', format: 'der' });
const cn = (s: string) => sequence(setOf(sequence(objectIdentifier(OID.commonName), utf8String(s))));
const utcTime = (d: Date) => tlv(UNIVERSAL, false, TAG.UTC_TIME, Buffer.from(d.toISOString().replace(/[-:T]|\.\d+/g, '').slice(2)));
const TRUE = tlv(UNIVERSAL, false, TAG.BOOLEAN, hex('ff'));
const ext = (id: string, value: Buffer, critical = false) => sequence(objectIdentifier(id), ...(critical ? [TRUE] : []), octetString(value));
const uri = (u: string | Buffer) => contextTag(6, false, Buffer.isBuffer(u) ? u : Buffer.from(u, 'latin1'));
const SVID_ID = 'spiffe://craft.knit/ns/default/svc/web';

interface Craft {
  extensions?: Buffer[] | null;
  notBefore?: Buffer;
  notAfter?: Buffer;
  subject?: Buffer;
  /** The serialNumber INTEGER's contents octets, hex. */
  serial?: string;
}

/** A self-issued certificate with exactly these fields, signed ECDSA-SHA256 by node:crypto. */
function craft(c: Craft = {}): Buffer {
  const now = Date.now();
  const exts = c.extensions === null ? [] : [contextTag(3, true, sequence(...(c.extensions ?? [ext(OID.subjectAltName, sequence(uri(SVID_ID)))])))];
  const tbs = sequence(
    ...(c.extensions === null ? [] : [contextTag(0, true, smallInteger(2))]),
    tlv(UNIVERSAL, false, TAG.INTEGER, hex(c.serial ?? '01020304')),
    sequence(objectIdentifier(OID.ecdsaWithSha256)),
    cn('craft issuer'),
    sequence(c.notBefore ?? utcTime(new Date(now - 60_000)), c.notAfter ?? utcTime(new Date(now + 3600_000))),
    c.subject ?? cn('craft'),
    spki,
    ...exts,
  );
  const sig = sign('sha256', tbs, { key: signer.privateKey, dsaEncoding: 'der' });
  return sequence(tbs, sequence(objectIdentifier(OID.ecdsaWithSha256)), bitStringOf(sig));
}

/** OpenSSL must parse what the test crafted: the point is what knit makes of certificates OpenSSL lets through. */
function opensslParses(der: Buffer): X509Certificate {
  const x = new X509Certificate(der);
  assert.ok(x.verify(signer.publicKey), 'the crafted certificate is well formed enough to verify');
  return x;
}

test('a crafted certificate reads back field for field', () => {
  const der = craft({ extensions: [ext(OID.subjectAltName, sequence(uri(SVID_ID))), ext(OID.keyUsage, hex('03 02 07 80'), true), ext(OID.basicConstraints, sequence(), true), ext(OID.extKeyUsage, sequence(objectIdentifier('1.3.6.1.5.5.7.3.2')))] });
  const x = opensslParses(der);
  const f = readCertificate(der);
  assert.equal(f.serial, '01020304');
  assert.equal(f.subject, 'CN=craft');
  assert.equal(f.notBefore.getTime(), Date.parse(x.validFrom));
  assert.equal(f.notAfter.getTime(), Date.parse(x.validTo));
  const info = certInfoFromDer(der);
  assert.deepEqual(info.uris, [SVID_ID]);
  assert.equal(info.spiffeId?.uri, SVID_ID);
  assert.equal(info.isCa, false);
  assert.deepEqual(info.keyUsage, { digitalSignature: true, keyCertSign: false, cRLSign: false, critical: true });
  assert.deepEqual(info.eku, ['1.3.6.1.5.5.7.3.2']);
  assert.deepEqual(x.keyUsage, info.eku, 'node:crypto reads the same EKU');
  assert.equal(info.publicKey.label, 'EC P-256');
  assert.equal(info.fingerprint, x.fingerprint256.replace(/:/g, '').toLowerCase());
});

test('a serial whose first byte is high reads without DER\'s 00 sign octet, as openssl prints it', () => {
  // About one openssl serial in 256 is encoded this way: 159 random bits with a zero top byte.
  const der = craft({ serial: '00a9be0d3fb533c69ef0a0408a2b3641e27092b4' });
  const x = opensslParses(der);
  assert.equal(readCertificate(der).serial, 'a9be0d3fb533c69ef0a0408a2b3641e27092b4');
  assert.equal(readCertificate(der).serial.toUpperCase(), x.serialNumber.replace(/^00/, ''));
  assert.equal(readCertificate(craft({ serial: '00' })).serial, '00', 'serial zero keeps its one octet');
});

test('cA=TRUE without keyCertSign is a CA certificate, whatever OpenSSL\'s X509_check_ca says', () => {
  const der = craft({ extensions: [ext(OID.subjectAltName, sequence(uri(SVID_ID))), ext(OID.basicConstraints, sequence(TRUE), true), ext(OID.keyUsage, hex('03 02 07 80'), true)] });
  const x = opensslParses(der);
  assert.equal(x.ca, false, 'node reports X509_check_ca, which needs keyCertSign');
  assert.equal(certInfoFromDer(der).isCa, true, 'knit reads the cA flag as written');
  // With a path length, and with no cA at all (DEFAULT FALSE).
  assert.deepEqual(readBasicConstraints(sequence(TRUE, smallInteger(0))), { ca: true });
  assert.deepEqual(readBasicConstraints(sequence()), { ca: false });
  malformed(() => readBasicConstraints(sequence(utf8String('x'))), /unexpected elements/);
});

test('an extension twice is refused, though OpenSSL parses the certificate', () => {
  const twoKu = craft({ extensions: [ext(OID.keyUsage, hex('03 02 07 80'), true), ext(OID.keyUsage, hex('03 02 01 86'), true)] });
  opensslParses(twoKu);
  malformed(() => certInfoFromDer(twoKu), /extension 2\.5\.29\.15 appears twice/);
  // Two SAN extensions: one SVID ID in each would otherwise read as one URI or two, depending on the reader.
  const twoSan = craft({ extensions: [ext(OID.subjectAltName, sequence(uri(SVID_ID))), ext(OID.subjectAltName, sequence(uri('spiffe://craft.knit/ns/default/svc/db')))] });
  opensslParses(twoSan);
  malformed(() => certInfoFromDer(twoSan), /appears twice/);
});

test('URI SANs come from DER: a URI that prints like two is one, other names are skipped', () => {
  const tricky = `${SVID_ID}, URI:spiffe://craft.knit/ns/default/svc/db`;
  const otherName = contextTag(0, true, Buffer.concat([objectIdentifier('1.2.3.4'), contextTag(0, true, utf8String('x'))]));
  const dirName = contextTag(4, true, cn('dir'));
  const der = craft({ extensions: [ext(OID.subjectAltName, sequence(otherName, contextTag(2, false, Buffer.from('web.example')), uri(tricky), contextTag(7, false, hex('7f000001')), dirName))] });
  const x = opensslParses(der);
  const info = certInfoFromDer(der);
  assert.deepEqual(info.uris, [tricky]);
  assert.equal(info.spiffeId, undefined, 'not a valid SPIFFE ID');
  assert.ok(x.subjectAltName?.includes('svc/db'), 'node\'s display string shows both IDs');
  assert.deepEqual(readSubjectAltName(sequence(uri('a'), contextTag(2, false, Buffer.from('b')), uri('c'))), { uris: ['a', 'c'], others: 1 });
  // Bytes outside ASCII read one character per byte, and make no SPIFFE ID.
  const high = certInfoFromDer(craft({ extensions: [ext(OID.subjectAltName, sequence(uri(Buffer.concat([Buffer.from(SVID_ID), hex('ff')]))))] }));
  assert.equal(high.uris[0], `${SVID_ID}\u00ff`);
  assert.equal(high.spiffeId, undefined);
  malformed(() => readSubjectAltName(sequence()), /empty GeneralNames/);
  malformed(() => readSubjectAltName(sequence(contextTag(6, true, Buffer.alloc(0)))), /constructed URI/);
});

test('a certificate without extensions, or with GeneralizedTime, or a non-critical KeyUsage', () => {
  const v1 = craft({ extensions: null });
  opensslParses(v1);
  const i1 = certInfoFromDer(v1);
  assert.deepEqual([i1.uris, i1.keyUsage, i1.keyUsages, i1.eku, i1.isCa, i1.spiffeId], [[], undefined, [], [], false, undefined]);

  const gen = craft({ notAfter: tlv(UNIVERSAL, false, TAG.GENERALIZED_TIME, Buffer.from('20510630120000Z')) });
  const x = opensslParses(gen);
  assert.equal(certInfoFromDer(gen).notAfter.toISOString(), '2051-06-30T12:00:00.000Z');
  assert.equal(Date.parse(x.validTo), Date.parse('2051-06-30T12:00:00Z'));

  const soft = certInfoFromDer(craft({ extensions: [ext(OID.keyUsage, hex('03 02 07 80'))] }));
  assert.deepEqual(soft.keyUsage, { digitalSignature: true, keyCertSign: false, cRLSign: false, critical: false });
});

test('a certificate whose extensions break the rules is refused, not guessed at', (t) => {
  const cases: Array<[string, Buffer, RegExp]> = [
    ['KeyUsage not a BIT STRING', ext(OID.keyUsage, hex('04 01 80')), /unexpected tag|BIT STRING/],
    ['critical not 0x00/0xff', sequence(objectIdentifier(OID.keyUsage), hex('01 01 01'), octetString(hex('03 02 07 80'))), /0x00 or 0xff/],
    ['trailing element in an extension', sequence(objectIdentifier(OID.keyUsage), octetString(hex('03 02 07 80')), utf8String('x')), /trailing elements/],
    ['EKU empty', ext(OID.extKeyUsage, sequence()), /empty ExtKeyUsageSyntax/],
    ['SAN with a universal tag', ext(OID.subjectAltName, sequence(utf8String(SVID_ID))), /GeneralName with tag/],
  ];
  const reached: string[] = [];
  for (const [what, e, re] of cases) {
    const der = craft({ extensions: [e] });
    try {
      opensslParses(der);
    } catch {
      t.diagnostic(`OpenSSL itself refuses: ${what}`);
      continue;
    }
    reached.push(what);
    malformed(() => certInfoFromDer(der), re);
  }
  assert.ok(reached.length >= 3, `most cases get past OpenSSL to knit's reader (${reached.join('; ')})`);
});
