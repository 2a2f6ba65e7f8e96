/**
 * The little DER (X.690) that knit reads and writes itself, so that the
 * agent handles certificates and CSRs with node:crypto alone: the x509
 * library costs an agent ~20 MB of memory for a handful of fields.
 *
 * Reading: node:crypto's X509Certificate has already parsed (and OpenSSL
 * has verified) a certificate, but it does not expose the KeyUsage bits,
 * the extensions' criticality, the basicConstraints cA flag as written (its
 * `ca` is OpenSSL's X509_check_ca, which says false for cA=TRUE without
 * keyCertSign), or the SAN URIs other than in a display string whose commas
 * and quotes a hostile URI can forge. So `readCertificate` walks the DER
 * itself, strictly: definite minimal lengths, no trailing bytes, every
 * element where RFC 5280 puts it, no extension twice. Anything else is
 * refused (KNIT_ERR_CERT), never guessed at.
 *
 * Writing: just enough to build a PKCS#10 request (csr.ts).
 */
import { KnitError } from '../errors.js';

/** ASN.1 tag classes. */
export const UNIVERSAL = 0;
export const CONTEXT = 2;

/** Universal tag numbers used here. */
export const TAG = {
  BOOLEAN: 1,
  INTEGER: 2,
  BIT_STRING: 3,
  OCTET_STRING: 4,
  NULL: 5,
  OID: 6,
  UTF8_STRING: 12,
  SEQUENCE: 16,
  SET: 17,
  PRINTABLE_STRING: 19,
  TELETEX_STRING: 20,
  IA5_STRING: 22,
  UTC_TIME: 23,
  GENERALIZED_TIME: 24,
  VISIBLE_STRING: 26,
  UNIVERSAL_STRING: 28,
  BMP_STRING: 30,
} as const;

/** One DER element: its tag, and views (no copies) of its whole encoding and of its contents. */
export interface Element {
  cls: number;
  constructed: boolean;
  /** The tag number within its class. */
  num: number;
  /** The whole TLV. */
  raw: Buffer;
  /** The contents octets. */
  value: Buffer;
}

const bad = (why: string): never => {
  throw new KnitError('KNIT_ERR_CERT', `malformed DER: ${why}`);
};

/**
 * Bounds on what is read: a length needing more than 4 octets (4 GiB) or a
 * tag number needing more than 4 cannot be in a certificate knit accepts.
 * Nesting needs no bound: the reader only descends into structures it
 * knows, never recursively into whatever it is given.
 */
const MAX_LENGTH_OCTETS = 4;
const MAX_TAG_OCTETS = 4;

/** Reads the element that starts at `at`; it must end within `limit`. */
function readAt(buf: Buffer, at: number, limit: number): Element {
  let p = at;
  if (p >= limit) bad('truncated (no tag)');
  const id = buf[p++]!;
  const cls = id >> 6;
  const constructed = (id & 0x20) !== 0;
  let num = id & 0x1f;
  if (num === 0x1f) {
    // High tag number form: base-128, minimal (no leading 0x80), and > 30 (else the low form is required).
    num = 0;
    for (let i = 0; ; i++) {
      if (p >= limit) bad('truncated tag');
      if (i >= MAX_TAG_OCTETS) bad('tag number too large');
      const b = buf[p++]!;
      if (i === 0 && b === 0x80) bad('non-minimal tag number');
      num = num * 128 + (b & 0x7f);
      if ((b & 0x80) === 0) break;
    }
    if (num < 0x1f) bad('non-minimal tag number');
  }
  if (p >= limit) bad('truncated (no length)');
  const first = buf[p++]!;
  let len: number;
  if (first < 0x80) {
    len = first;
  } else {
    const n = first & 0x7f;
    if (n === 0) bad('indefinite length (BER, not DER)');
    if (n > MAX_LENGTH_OCTETS) bad('length too large');
    if (p + n > limit) bad('truncated length');
    if (buf[p] === 0) bad('non-minimal length');
    len = 0;
    for (let i = 0; i < n; i++) len = len * 256 + buf[p++]!;
    if (len < 0x80) bad('non-minimal length');
  }
  if (p + len > limit) bad(`element of ${len} bytes runs past its container`);
  return { cls, constructed, num, raw: buf.subarray(at, p + len), value: buf.subarray(p, p + len) };
}

/** Parses `buf` as exactly one element, with nothing after it. */
export function parse(buf: Buffer): Element {
  const el = readAt(buf, 0, buf.length);
  if (el.raw.length !== buf.length) bad(`${buf.length - el.raw.length} trailing bytes`);
  return el;
}

/** The elements inside a constructed element, which must fill it exactly. */
export function children(el: Element): Element[] {
  if (!el.constructed) bad('expected a constructed element');
  const out: Element[] = [];
  for (let at = 0; at < el.value.length; ) {
    const c = readAt(el.value, at, el.value.length);
    out.push(c);
    at += c.raw.length;
  }
  return out;
}

/** Checks an element's tag; `what` names it in the error. */
export function expect(el: Element | undefined, cls: number, num: number, what: string): Element {
  if (!el) return bad(`${what} missing`);
  if (el.cls !== cls || el.num !== num) bad(`${what}: unexpected tag [${el.cls}:${el.num}]`);
  const shouldConstruct = cls === UNIVERSAL && (num === TAG.SEQUENCE || num === TAG.SET);
  if (cls === UNIVERSAL && el.constructed !== shouldConstruct) bad(`${what}: wrong constructed bit`);
  return el;
}

/** True when `el` is present and has this class and tag number. */
export const is = (el: Element | undefined, cls: number, num: number): boolean => !!el && el.cls === cls && el.num === num;

/** An OBJECT IDENTIFIER in dotted form. */
export function oid(el: Element): string {
  expect(el, UNIVERSAL, TAG.OID, 'OBJECT IDENTIFIER');
  const v = el.value;
  if (v.length === 0) bad('empty OBJECT IDENTIFIER');
  if ((v[v.length - 1]! & 0x80) !== 0) bad('OBJECT IDENTIFIER ends inside a subidentifier');
  const arcs: number[] = [];
  let n = 0;
  let start = true;
  for (const b of v) {
    if (start && b === 0x80) bad('non-minimal OBJECT IDENTIFIER subidentifier');
    // 2^53 is far beyond any real arc; refuse rather than lose precision.
    if (n > 2 ** 45) bad('OBJECT IDENTIFIER arc too large');
    n = n * 128 + (b & 0x7f);
    start = (b & 0x80) === 0;
    if (start) {
      arcs.push(n);
      n = 0;
    }
  }
  const first = arcs[0]!;
  const head = first < 40 ? [0, first] : first < 80 ? [1, first - 40] : [2, first - 80];
  return [...head, ...arcs.slice(1)].join('.');
}

/** A DER BOOLEAN: 0x00 or 0xff, nothing else. */
export function boolean(el: Element): boolean {
  expect(el, UNIVERSAL, TAG.BOOLEAN, 'BOOLEAN');
  if (el.value.length !== 1 || (el.value[0] !== 0 && el.value[0] !== 0xff)) bad('BOOLEAN is not 0x00 or 0xff');
  return el.value[0] === 0xff;
}

/** An INTEGER's contents octets (two's complement, big-endian), checked minimal. */
export function integerBytes(el: Element): Buffer {
  expect(el, UNIVERSAL, TAG.INTEGER, 'INTEGER');
  const v = el.value;
  if (v.length === 0) bad('empty INTEGER');
  if (v.length > 1 && ((v[0] === 0 && (v[1]! & 0x80) === 0) || (v[0] === 0xff && (v[1]! & 0x80) !== 0))) bad('non-minimal INTEGER');
  return v;
}

/** A BIT STRING: its bytes and how many bits of the last byte are unused. */
export function bitString(el: Element): { bytes: Buffer; unused: number } {
  expect(el, UNIVERSAL, TAG.BIT_STRING, 'BIT STRING');
  const v = el.value;
  if (v.length === 0) bad('empty BIT STRING');
  const unused = v[0]!;
  if (unused > 7 || (v.length === 1 && unused !== 0)) bad('BIT STRING with a bad unused-bits count');
  const bytes = v.subarray(1);
  if (unused > 0 && (bytes[bytes.length - 1]! & ((1 << unused) - 1)) !== 0) bad('BIT STRING with unused bits set');
  return { bytes, unused };
}

/** Bit `i` (0 = the most significant bit of the first byte) of a BIT STRING; false past its end. */
export function bit(bytes: Buffer, i: number): boolean {
  const byte = bytes[i >> 3];
  return byte !== undefined && (byte & (0x80 >> (i & 7))) !== 0;
}

/** UTCTime (YYMMDDHHMMSSZ) or GeneralizedTime (YYYYMMDDHHMMSSZ), the only forms RFC 5280 allows. */
export function time(el: Element): Date {
  const s = el.value.toString('latin1');
  let m: RegExpExecArray | null;
  let year: number;
  if (is(el, UNIVERSAL, TAG.UTC_TIME) && !el.constructed && (m = /^(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)Z$/.exec(s))) {
    // RFC 5280 4.1.2.5.1: YY >= 50 is 19YY, else 20YY.
    const yy = Number(m[1]);
    year = yy >= 50 ? 1900 + yy : 2000 + yy;
  } else if (is(el, UNIVERSAL, TAG.GENERALIZED_TIME) && !el.constructed && (m = /^(\d{4})(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)Z$/.exec(s))) {
    year = Number(m[1]);
  } else {
    return bad(`not an RFC 5280 time: ${JSON.stringify(s.slice(0, 40))}`);
  }
  const [mo, d, h, mi, sec] = [m[2], m[3], m[4], m[5], m[6]].map(Number) as [number, number, number, number, number];
  const t = Date.UTC(year, mo - 1, d, h, mi, sec);
  const back = new Date(t);
  // Date.UTC rolls over (Feb 30 -> Mar 2); a real date reads back the same.
  if (back.getUTCMonth() !== mo - 1 || back.getUTCDate() !== d || h > 23 || mi > 59 || sec > 59) bad(`not a real time: ${s}`);
  return back;
}

/** Attribute type names as @peculiar/x509 prints them, so `subject` reads as it always did. */
const NAME_TYPES: Record<string, string> = {
  '2.5.4.3': 'CN',
  '2.5.4.7': 'L',
  '2.5.4.8': 'ST',
  '2.5.4.10': 'O',
  '2.5.4.11': 'OU',
  '2.5.4.6': 'C',
  '0.9.2342.19200300.100.1.25': 'DC',
  '1.2.840.113549.1.9.1': 'E',
  '2.5.4.42': 'G',
  '2.5.4.43': 'I',
  '2.5.4.4': 'SN',
  '2.5.4.12': 'T',
};

/** A directory string's text, or undefined for a type that is not a string. */
function directoryString(el: Element): string | undefined {
  if (el.cls !== UNIVERSAL || el.constructed) return undefined;
  switch (el.num) {
    case TAG.UTF8_STRING:
      return el.value.toString('utf8');
    case TAG.PRINTABLE_STRING:
    case TAG.IA5_STRING:
    case TAG.VISIBLE_STRING:
    case TAG.TELETEX_STRING:
      return el.value.toString('latin1');
    case TAG.BMP_STRING:
      if (el.value.length % 2) return undefined;
      return Buffer.from(el.value).swap16().toString('utf16le');
    case TAG.UNIVERSAL_STRING: {
      if (el.value.length % 4) return undefined;
      let s = '';
      for (let i = 0; i < el.value.length; i += 4) s += String.fromCodePoint(el.value.readUInt32BE(i));
      return s;
    }
    default:
      return undefined;
  }
}

/** RFC 4514 escaping, as @peculiar/x509 does it. */
const escapeValue = (v: string): string =>
  v
    .replace(/([,+"\\<>;])/g, '\\$1')
    .replace(/^([ #])/, '\\$1')
    .replace(/ $/, '\\ ')
    .replace(/[\r\n\t]/g, (c) => `\\${c.charCodeAt(0).toString(16).padStart(2, '0').toUpperCase()}`);

/**
 * A Name as text, RDNs in encoded order joined by ", " (multi-valued RDNs
 * by "+"), e.g. `CN=knit root CA t.knit, O=knit`: for logs and messages.
 * Code that must match names byte for byte compares the DER, not this.
 */
export function nameToString(el: Element): string {
  expect(el, UNIVERSAL, TAG.SEQUENCE, 'Name');
  return children(el)
    .map((rdn) =>
      children(expect(rdn, UNIVERSAL, TAG.SET, 'RelativeDistinguishedName'))
        .map((atv) => {
          const [type, value, ...rest] = children(expect(atv, UNIVERSAL, TAG.SEQUENCE, 'AttributeTypeAndValue'));
          if (!type || !value || rest.length) bad('AttributeTypeAndValue is not a type and a value');
          const t = oid(type!);
          const text = directoryString(value!);
          return `${NAME_TYPES[t] ?? t}=${text === undefined ? `#${value!.raw.toString('hex')}` : escapeValue(text)}`;
        })
        .join('+'),
    )
    .join(', ');
}

/** One certificate extension as written. */
export interface Extension {
  critical: boolean;
  /** The extnValue OCTET STRING's contents: the extension's own DER. */
  value: Buffer;
}

/** The fields knit reads from a certificate's DER. */
export interface CertificateFields {
  /** The serial number in lowercase hex, without the 00 octet DER puts before a high first byte (as openssl and @peculiar/x509 print it). */
  serial: string;
  subject: string;
  notBefore: Date;
  notAfter: Date;
  /** Extensions by OID; none appears twice. */
  extensions: Map<string, Extension>;
}

/**
 * Walks an X.509 certificate (RFC 5280 4.1):
 *   Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
 *   TBSCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber, signature,
 *     issuer, validity, subject, subjectPublicKeyInfo, [1] issuerUniqueID OPTIONAL,
 *     [2] subjectUniqueID OPTIONAL, [3] extensions OPTIONAL }
 */
export function readCertificate(der: Buffer): CertificateFields {
  const cert = children(expect(parse(der), UNIVERSAL, TAG.SEQUENCE, 'Certificate'));
  if (cert.length !== 3) bad(`Certificate has ${cert.length} elements, not 3`);
  const tbs = children(expect(cert[0], UNIVERSAL, TAG.SEQUENCE, 'TBSCertificate'));
  let i = 0;
  if (is(tbs[i], CONTEXT, 0)) i++;
  // Not integerBytes: RFC 5280 4.1.2.2 tells readers to cope with CAs that encode serials loosely, and knit only logs it.
  const serialOctets = expect(tbs[i++], UNIVERSAL, TAG.INTEGER, 'serialNumber').value;
  if (serialOctets.length === 0) bad('empty serialNumber');
  const serial = (serialOctets.length > 1 && serialOctets[0] === 0 ? serialOctets.subarray(1) : serialOctets).toString('hex');
  expect(tbs[i++], UNIVERSAL, TAG.SEQUENCE, 'signature AlgorithmIdentifier');
  expect(tbs[i++], UNIVERSAL, TAG.SEQUENCE, 'issuer');
  const validity = children(expect(tbs[i++], UNIVERSAL, TAG.SEQUENCE, 'validity'));
  if (validity.length !== 2) bad('validity is not two times');
  const subject = nameToString(tbs[i++]!);
  expect(tbs[i++], UNIVERSAL, TAG.SEQUENCE, 'subjectPublicKeyInfo');
  if (is(tbs[i], CONTEXT, 1)) i++;
  if (is(tbs[i], CONTEXT, 2)) i++;
  const extensions = new Map<string, Extension>();
  if (is(tbs[i], CONTEXT, 3)) {
    const wrapper = tbs[i++]!;
    if (!wrapper.constructed) bad('extensions [3] is not constructed');
    const inner = children(wrapper);
    if (inner.length !== 1) bad('extensions [3] must hold one SEQUENCE');
    for (const ext of children(expect(inner[0], UNIVERSAL, TAG.SEQUENCE, 'Extensions'))) {
      const parts = children(expect(ext, UNIVERSAL, TAG.SEQUENCE, 'Extension'));
      const id = oid(expect(parts[0], UNIVERSAL, TAG.OID, 'extnID'));
      let critical = false;
      let j = 1;
      if (is(parts[j], UNIVERSAL, TAG.BOOLEAN)) critical = boolean(parts[j++]!);
      const value = expect(parts[j++], UNIVERSAL, TAG.OCTET_STRING, `extnValue of ${id}`).value;
      if (j !== parts.length) bad(`extension ${id} has trailing elements`);
      // RFC 5280 4.2: "A certificate MUST NOT include more than one instance of a particular extension."
      if (extensions.has(id)) bad(`extension ${id} appears twice`);
      extensions.set(id, { critical, value });
    }
  }
  if (i !== tbs.length) bad('TBSCertificate has unexpected trailing elements');
  return { serial, subject, notBefore: time(validity[0]!), notAfter: time(validity[1]!), extensions };
}

/** Extension OIDs knit reads. */
export const OID = {
  basicConstraints: '2.5.29.19',
  keyUsage: '2.5.29.15',
  extKeyUsage: '2.5.29.37',
  subjectAltName: '2.5.29.17',
  extensionRequest: '1.2.840.113549.1.9.14',
  ecdsaWithSha256: '1.2.840.10045.4.3.2',
  commonName: '2.5.4.3',
} as const;

/** basicConstraints (RFC 5280 4.2.1.9): SEQUENCE { cA BOOLEAN DEFAULT FALSE, pathLenConstraint INTEGER OPTIONAL }. */
export function readBasicConstraints(value: Buffer): { ca: boolean } {
  const parts = children(expect(parse(value), UNIVERSAL, TAG.SEQUENCE, 'BasicConstraints'));
  let i = 0;
  const ca = is(parts[i], UNIVERSAL, TAG.BOOLEAN) ? boolean(parts[i++]!) : false;
  if (is(parts[i], UNIVERSAL, TAG.INTEGER)) integerBytes(parts[i++]!);
  if (i !== parts.length) bad('BasicConstraints has unexpected elements');
  return { ca };
}

/** RFC 5280 4.2.1.3 KeyUsage bit names, in bit order. */
export const KEY_USAGE_NAMES = ['digitalSignature', 'nonRepudiation', 'keyEncipherment', 'dataEncipherment', 'keyAgreement', 'keyCertSign', 'cRLSign', 'encipherOnly', 'decipherOnly'] as const;
export type KeyUsageName = (typeof KEY_USAGE_NAMES)[number];

/** KeyUsage: a BIT STRING; returns the names of the bits set (bits past decipherOnly are ignored). */
export function readKeyUsage(value: Buffer): KeyUsageName[] {
  const { bytes } = bitString(parse(value));
  return KEY_USAGE_NAMES.filter((_, i) => bit(bytes, i));
}

/** ExtKeyUsageSyntax: SEQUENCE SIZE (1..MAX) OF KeyPurposeId (OIDs). */
export function readExtKeyUsage(value: Buffer): string[] {
  const list = children(expect(parse(value), UNIVERSAL, TAG.SEQUENCE, 'ExtKeyUsageSyntax'));
  if (list.length === 0) bad('empty ExtKeyUsageSyntax');
  return list.map(oid);
}

/**
 * GeneralNames: SEQUENCE SIZE (1..MAX) OF GeneralName. Returns the
 * uniformResourceIdentifier ([6] IMPLICIT IA5String) names, byte for byte
 * (latin1: one character per byte, so no two encodings read alike), and
 * how many names of other kinds there are.
 */
export function readSubjectAltName(value: Buffer): { uris: string[]; others: number } {
  const names = children(expect(parse(value), UNIVERSAL, TAG.SEQUENCE, 'GeneralNames'));
  if (names.length === 0) bad('empty GeneralNames');
  const uris: string[] = [];
  let others = 0;
  for (const n of names) {
    if (n.cls !== CONTEXT || n.num > 8) bad(`GeneralName with tag [${n.cls}:${n.num}]`);
    if (n.num === 6) {
      if (n.constructed) bad('constructed URI GeneralName');
      uris.push(n.value.toString('latin1'));
    } else {
      others++;
    }
  }
  return { uris, others };
}

// ---------------------------------------------------------------------------
// Writing.

function lengthOctets(n: number): Buffer {
  if (n < 0x80) return Buffer.from([n]);
  const bytes: number[] = [];
  for (let v = n; v > 0; v = Math.floor(v / 256)) bytes.unshift(v & 0xff);
  return Buffer.from([0x80 | bytes.length, ...bytes]);
}

/** One element with a low tag number (< 31, all this module writes). */
export function tlv(cls: number, constructed: boolean, num: number, value: Buffer): Buffer {
  if (num >= 0x1f) throw new RangeError('high tag numbers are not written');
  return Buffer.concat([Buffer.from([(cls << 6) | (constructed ? 0x20 : 0) | num]), lengthOctets(value.length), value]);
}

export const sequence = (...items: Buffer[]): Buffer => tlv(UNIVERSAL, true, TAG.SEQUENCE, Buffer.concat(items));
/** A SET OF: DER orders its elements by their encodings (X.690 11.6). */
export const setOf = (...items: Buffer[]): Buffer => tlv(UNIVERSAL, true, TAG.SET, Buffer.concat([...items].sort((a, b) => Buffer.compare(a, b))));
export const octetString = (b: Buffer): Buffer => tlv(UNIVERSAL, false, TAG.OCTET_STRING, b);
/** A BIT STRING of whole bytes. */
export const bitStringOf = (b: Buffer): Buffer => tlv(UNIVERSAL, false, TAG.BIT_STRING, Buffer.concat([Buffer.from([0]), b]));
export const utf8String = (s: string): Buffer => tlv(UNIVERSAL, false, TAG.UTF8_STRING, Buffer.from(s, 'utf8'));
/** A context-specific tag around `value` (`constructed` for EXPLICIT or a constructed IMPLICIT type). */
export const contextTag = (num: number, constructed: boolean, value: Buffer): Buffer => tlv(CONTEXT, constructed, num, value);

/** A small non-negative INTEGER. */
export function smallInteger(n: number): Buffer {
  if (!Number.isSafeInteger(n) || n < 0) throw new RangeError(`not a small non-negative integer: ${n}`);
  const bytes: number[] = [];
  for (let v = n; v > 0; v = Math.floor(v / 256)) bytes.unshift(v & 0xff);
  if (bytes.length === 0 || bytes[0]! & 0x80) bytes.unshift(0);
  return tlv(UNIVERSAL, false, TAG.INTEGER, Buffer.from(bytes));
}

/** An OBJECT IDENTIFIER from dotted form. */
export function objectIdentifier(dotted: string): Buffer {
  const arcs = dotted.split('.').map((a) => {
    if (!/^\d+$/.test(a)) throw new RangeError(`bad OID ${dotted}`);
    return Number(a);
  });
  if (arcs.length < 2 || arcs[0]! > 2 || (arcs[0]! < 2 && arcs[1]! >= 40)) throw new RangeError(`bad OID ${dotted}`);
  const out: number[] = [];
  for (const arc of [arcs[0]! * 40 + arcs[1]!, ...arcs.slice(2)]) {
    const groups: number[] = [arc & 0x7f];
    for (let v = Math.floor(arc / 128); v > 0; v = Math.floor(v / 128)) groups.unshift((v & 0x7f) | 0x80);
    out.push(...groups);
  }
  return tlv(UNIVERSAL, false, TAG.OID, Buffer.from(out));
}

/** PEM armour with 64-character lines and no trailing newline (as @peculiar/x509 wrote it). */
export function toPem(der: Buffer, label: string): string {
  const lines = der.toString('base64').match(/.{1,64}/g) ?? [];
  return `-----BEGIN ${label}-----\n${lines.join('\n')}\n-----END ${label}-----`;
}
