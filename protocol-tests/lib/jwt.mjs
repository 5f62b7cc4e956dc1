// Tiny HS256 JWT signer (node:crypto only), so the suite needs no JWT library.
import { createHmac } from 'node:crypto'

/** The secret Supabase's self-hosted examples use; the harness gives it to the gateway as API_JWT_SECRET. */
export const JWT_SECRET = 'super-secret-jwt-token-with-at-least-32-characters-long'

const b64url = (v) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url')

/** Signs `claims` with HS256 and returns the compact JWT. */
export function signHS256(claims, secret = JWT_SECRET) {
  const head = b64url({ alg: 'HS256', typ: 'JWT' })
  const body = b64url(claims)
  const sig = createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url')
  return `${head}.${body}.${sig}`
}

/** A Supabase-style anon key: role anon, issued now, expiring in 2100. */
export const ANON_KEY = signHS256({
  iss: 'supabase-demo',
  role: 'anon',
  iat: Math.floor(Date.now() / 1000),
  exp: 4102444800, // 2100-01-01T00:00:00Z
})
