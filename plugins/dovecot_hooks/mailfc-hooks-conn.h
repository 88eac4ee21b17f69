/* mailfc-hooks-conn.h: the imap process's one connection to the mailfc hook server.
   See mailfc-hooks-conn.c for the manual. */
#ifndef MAILFC_HOOKS_CONN_H
#define MAILFC_HOOKS_CONN_H

/* A line the server sent that nobody waits for (WATCH, late replies, ERROR),
   split into its unescaped fields. */
typedef void hooks_conn_line_callback_t(const char *const *fields);
/* The connection was (re)established: announce the live sessions again. */
typedef void hooks_conn_connected_callback_t(void);

void hooks_conn_init(const char *socket_path, unsigned int timeout_msecs,
		     bool fail_closed, hooks_conn_line_callback_t *line_cb,
		     hooks_conn_connected_callback_t *connected_cb);
void hooks_conn_deinit(void);
bool hooks_conn_initialized(void);

/* Connected, or connected now (at most one attempt per second while the
   server is down).  FALSE: unavailable, and Dovecot's log says why. */
bool hooks_conn_connect(void);

/* Send a line that needs no reply.  Never blocks; a record that cannot be
   sent is counted and reported when the server is reachable again. */
void hooks_conn_send(const char *line);

/* Send a request and wait up to the timeout for its reply, the line whose
   first fields are word, sid (and cid when cid != 0).  Returns the reply's
   fields, or NULL with *why_r set (not connected, timeout, connection lost). */
const char *const *hooks_conn_request(const char *line, const char *word,
				      unsigned int sid, unsigned int cid,
				      const char **why_r);

/* The failure policy: TRUE when commands are refused while the server is
   unavailable (from the plugin settings, then from the server's HELLO). */
bool hooks_conn_fail_closed(void);

#endif
