-- miltertest script: drives the mailfc milter as Postfix would (protocol 6).
-- Environment: MILTER_SOCKET (unix socket path).  Expects m1.example with
-- bob limited to 2 recipients per message and a block on sender domain
-- spam.example (the pytest test sets these up), and exits non-zero on any
-- unexpected reply.
local socket = os.getenv("MILTER_SOCKET")
local conn = mt.connect("unix:" .. socket, 20, 0.05)
if conn == nil then error("cannot connect to " .. socket) end

local function expect(want, what)
    local got = mt.getreply(conn)
    if got ~= want then
        error(what .. ": reply " .. tostring(got) .. ", expected " .. tostring(want))
    end
end

if mt.negotiate(conn, nil, nil, nil) ~= nil then error("negotiate failed") end
mt.macro(conn, SMFIC_CONNECT, "{daemon_name}", "m1.example", "j", "mail.m1.example")
if mt.conninfo(conn, "client.example", "192.0.2.7") ~= nil then error("conninfo failed") end
if mt.helo(conn, "client.example") ~= nil then error("helo failed") end

-- A message within the limits.
mt.macro(conn, SMFIC_MAIL, "{auth_authen}", "bob@m1.example", "{auth_type}", "PLAIN")
if mt.mailfrom(conn, "<bob@m1.example>", "SIZE=120") ~= nil then error("mail failed") end
expect(SMFIR_CONTINUE, "MAIL")
if mt.rcptto(conn, "<one@remote.example>") ~= nil then error("rcpt failed") end
expect(SMFIR_CONTINUE, "RCPT 1")
if mt.rcptto(conn, "<two@remote.example>") ~= nil then error("rcpt failed") end
expect(SMFIR_CONTINUE, "RCPT 2")
-- The third recipient is over recipients_per_message 2: a 451 for it alone.
if mt.rcptto(conn, "<three@remote.example>") ~= nil then error("rcpt failed") end
expect(SMFIR_REPLYCODE, "RCPT 3")
if mt.header(conn, "Message-ID", "<mt-1@m1.example>") ~= nil then error("header failed") end
if mt.header(conn, "Subject", "miltertest") ~= nil then error("header failed") end
if mt.eoh(conn) ~= nil then error("eoh failed") end
if mt.bodystring(conn, "hello\r\n") ~= nil then error("body failed") end
mt.macro(conn, SMFIC_RCPT, "i", "MT1QUEUE")
if mt.eom(conn) ~= nil then error("eom failed") end
expect(SMFIR_CONTINUE, "EOM")

-- An aborted transaction, then a blocked sender.
if mt.mailfrom(conn, "<bob@m1.example>") ~= nil then error("mail failed") end
expect(SMFIR_CONTINUE, "MAIL 2")
if mt.abort(conn) ~= nil then error("abort failed") end
if mt.mailfrom(conn, "<x@spam.example>") ~= nil then error("mail failed") end
expect(SMFIR_REPLYCODE, "MAIL blocked")

mt.disconnect(conn)
mt.echo("miltertest script done")
