/* mailfc-hooks-conn.c: the imap process's connection to the mailfc hook server.

NAME
	hooks_conn - one unix-socket connection per imap process, line protocol

DESCRIPTION
	The plugin asks the hook server before watched commands and records
	every command and session end.  This file owns the socket:

	- connect lazily (first session) to mailfc_hooks_socket; after a failure
	  try again at most once per second, so a stopped server costs a
	  connect() per second and not one per command;
	- requests (SESSION, CMD) are written and their reply is awaited with
	  poll() for at most the timeout; lines that arrive meanwhile and are
	  not the awaited reply (WATCH, late replies of timed-out requests) go
	  to the line callback, as do lines that arrive between requests (an io
	  on the socket in Dovecot's ioloop);
	- records (DONE, END) are written without waiting for a reply, and
	  not one by one: they collect in the output buffer, which leaves when
	  FLUSH_BYTES have gathered, FLUSH_MSECS after the first one, or with
	  the next request (records before it keep their order).  A busy imap
	  process so makes one write per batch instead of one per command, and
	  the server one read;  what the socket does not take at once waits in
	  the bounded buffer flushed from the ioloop; beyond OUTPUT_MAX bytes
	  records are dropped and counted;
	- the server's HELLO line (first on each connection) carries the
	  protocol version and the failure settings the server wants: they
	  replace the plugin settings from then on, so `mailfc` configures them
	  without touching dovecot.conf.

DIAGNOSTICS
	Every outage is logged once when it starts (why: connect() failed,
	connection lost, timeout) with the failure policy applied, and once when
	the server is reachable again with the number of records lost meanwhile.
	Timeouts of a connected server are logged at most every 10 seconds.
*/

#include "lib.h"
#include "buffer.h"
#include "ioloop.h"
#include "str.h"
#include "strescape.h"
#include "time-util.h"

#include "mailfc-hooks-protocol.h"
#include "mailfc-hooks-conn.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define LOG_PREFIX "mailfc_hooks: "
/* Unsent records kept while the server is slow to read. */
#define OUTPUT_MAX (1024 * 1024)
/* Records wait at most this long, or until this many bytes gathered. */
#define FLUSH_MSECS 20
#define FLUSH_BYTES (16 * 1024)
#define RETRY_SECS 1
#define TIMEOUT_LOG_SECS 10

static struct {
	char *path;
	int fd;
	struct io *io_in, *io_out;
	struct timeout *to_flush;
	buffer_t *input, *output;
	unsigned int timeout_msecs;
	bool fail_closed;
	/* An outage is in progress (logged when it began). */
	bool down;
	time_t retry_at, timeout_logged_at;
	unsigned int lost, timeouts;
	hooks_conn_line_callback_t *line_cb;
	hooks_conn_connected_callback_t *connected_cb;
} conn = { .fd = -1 };

static void conn_input(void *context);

static const char *conn_policy(void)
{
	return conn.fail_closed ?
		"failing closed: commands are refused until it is back" :
		"failing open: commands run unchecked and unrecorded until it is back";
}

static void conn_close(void)
{
	io_remove(&conn.io_in);
	io_remove(&conn.io_out);
	timeout_remove(&conn.to_flush);
	if (conn.fd != -1) {
		i_close_fd(&conn.fd);
	}
	buffer_set_used_size(conn.input, 0);
	buffer_set_used_size(conn.output, 0);
}

static void conn_fail(const char *why)
{
	conn_close();
	conn.retry_at = ioloop_time + RETRY_SECS;
	if (!conn.down) {
		i_warning(LOG_PREFIX "hook server %s unavailable: %s; %s",
			  conn.path, why, conn_policy());
		conn.down = TRUE;
	}
}

static void conn_lost_record(void)
{
	conn.lost++;
}

/* Write what the socket takes now; 0 when all is written, 1 when some is
   left in the output buffer, -1 when the connection failed. */
static int conn_flush(void)
{
	while (conn.output->used > 0) {
		ssize_t ret = send(conn.fd, conn.output->data, conn.output->used,
				   MSG_NOSIGNAL | MSG_DONTWAIT);
		if (ret < 0) {
			if (errno == EAGAIN || errno == EINTR)
				return 1;
			conn_fail(t_strdup_printf("send() failed: %m"));
			return -1;
		}
		buffer_delete(conn.output, 0, ret);
	}
	io_remove(&conn.io_out);
	return 0;
}

static void conn_output(void *context ATTR_UNUSED)
{
	T_BEGIN {
		(void)conn_flush();
	} T_END;
}

/* Write the output buffer now; what the socket does not take leaves when it
   becomes writable. */
static void conn_send_now(void)
{
	timeout_remove(&conn.to_flush);
	if (conn_flush() > 0 && conn.io_out == NULL)
		conn.io_out = io_add(conn.fd, IO_WRITE, conn_output, NULL);
}

static void conn_flush_timeout(void *context ATTR_UNUSED)
{
	T_BEGIN {
		conn_send_now();
	} T_END;
}

/* Queue a line: a request (now) leaves at once with the records before it, a
   record waits for its batch. */
static void conn_queue(const char *line, size_t size, bool now)
{
	if (conn.output->used + size > OUTPUT_MAX) {
		conn_lost_record();
		return;
	}
	buffer_append(conn.output, line, size);
	if (now || conn.output->used >= FLUSH_BYTES)
		conn_send_now();
	else if (conn.to_flush == NULL && conn.io_out == NULL)
		conn.to_flush = timeout_add_short(FLUSH_MSECS, conn_flush_timeout,
						  NULL);
}

static void conn_hello(const char *const *fields)
{
	unsigned int version, timeout;

	if (str_array_length(fields) < 4 ||
	    str_to_uint(fields[1], &version) < 0 ||
	    str_to_uint(fields[2], &timeout) < 0) {
		i_error(LOG_PREFIX "hook server %s sent a malformed HELLO",
			conn.path);
		return;
	}
	if (version != MAILFC_HOOKS_VERSION) {
		/* Talking past each other would be worse than not talking. */
		i_error(LOG_PREFIX "hook server %s speaks protocol version %u, "
			"this plugin %u: rebuild the plugin (make -C "
			"plugins/dovecot_hooks install)", conn.path, version,
			MAILFC_HOOKS_VERSION);
		conn_fail("protocol version mismatch");
		return;
	}
	if (timeout > 0)
		conn.timeout_msecs = timeout;
	conn.fail_closed = strcmp(fields[3], MAILFC_HOOKS_FAILURE_CLOSED) == 0;
}

/* The next complete line from the input buffer, or NULL. */
static const char *const *conn_next_line(void)
{
	const unsigned char *data = conn.input->data, *lf;
	const char *const *fields;
	char *line;

	lf = memchr(data, '\n', conn.input->used);
	if (lf == NULL) {
		if (conn.input->used > MAILFC_HOOKS_MAX_LINE)
			conn_fail("the server sent an overlong line");
		return NULL;
	}
	line = t_malloc_no0(lf - data + 1);
	memcpy(line, data, lf - data);
	line[lf - data] = '\0';
	buffer_delete(conn.input, 0, lf - data + 1);
	fields = t_strsplit_tabescaped_inplace(line);
	if (fields[0] != NULL && strcmp(fields[0], MAILFC_HOOKS_HELLO) == 0) {
		conn_hello(fields);
		return conn.fd == -1 ? NULL : conn_next_line();
	}
	return fields;
}

/* Read what is there: 1 read something, 0 nothing now, -1 connection gone. */
static int conn_read(void)
{
	unsigned char buf[4096];
	ssize_t ret;

	ret = recv(conn.fd, buf, sizeof(buf), MSG_DONTWAIT);
	if (ret > 0) {
		buffer_append(conn.input, buf, ret);
		return 1;
	}
	if (ret < 0 && (errno == EAGAIN || errno == EINTR))
		return 0;
	conn_fail(ret == 0 ? "the server closed the connection" :
		  t_strdup_printf("recv() failed: %m"));
	return -1;
}

static void conn_dispatch_buffered(void)
{
	const char *const *fields;

	while (conn.fd != -1 && (fields = conn_next_line()) != NULL) {
		if (fields[0] != NULL)
			conn.line_cb(fields);
	}
}

static void conn_input(void *context ATTR_UNUSED)
{
	T_BEGIN {
		if (conn_read() > 0)
			conn_dispatch_buffered();
	} T_END;
}

bool hooks_conn_connect(void)
{
	union {
		struct sockaddr sa;
		struct sockaddr_un un;
	} addr;
	int fd;

	if (conn.fd != -1)
		return TRUE;
	if (ioloop_time < conn.retry_at)
		return FALSE;

	i_zero(&addr);
	addr.un.sun_family = AF_UNIX;
	if (i_strocpy(addr.un.sun_path, conn.path, sizeof(addr.un.sun_path)) < 0) {
		conn_fail("socket path too long");
		return FALSE;
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd == -1) {
		conn_fail(t_strdup_printf("socket() failed: %m"));
		return FALSE;
	}
	if (connect(fd, &addr.sa, sizeof(addr.un)) < 0) {
		const char *why = t_strdup_printf("connect() failed: %m");
		i_close_fd(&fd);
		conn_fail(why);
		return FALSE;
	}
	conn.fd = fd;
	conn.io_in = io_add(fd, IO_READ, conn_input, NULL);
	if (conn.down) {
		i_info(LOG_PREFIX "hook server %s reachable again; %u records "
		       "could not be sent meanwhile", conn.path, conn.lost);
		conn.down = FALSE;
		conn.lost = 0;
	}
	conn.connected_cb();
	return conn.fd != -1;
}

void hooks_conn_send(const char *line)
{
	if (!hooks_conn_connect()) {
		conn_lost_record();
		return;
	}
	conn_queue(line, strlen(line), FALSE);
}

static bool conn_reply_matches(const char *const *fields, const char *word,
			       unsigned int sid, unsigned int cid)
{
	unsigned int value;

	if (fields[0] == NULL || strcmp(fields[0], word) != 0 ||
	    fields[1] == NULL || str_to_uint(fields[1], &value) < 0 ||
	    value != sid)
		return FALSE;
	if (cid == 0)
		return TRUE;
	return fields[2] != NULL && str_to_uint(fields[2], &value) == 0 &&
		value == cid;
}

static int conn_msecs_left(const struct timeval *deadline)
{
	struct timeval now;

	i_gettimeofday(&now);
	return timeval_diff_msecs(deadline, &now);
}

static void conn_timed_out(const char *word)
{
	conn.timeouts++;
	if (ioloop_time - conn.timeout_logged_at < TIMEOUT_LOG_SECS)
		return;
	i_warning(LOG_PREFIX "hook server %s did not answer %s within %u ms "
		  "(%u timeouts so far); %s", conn.path, word,
		  conn.timeout_msecs, conn.timeouts,
		  conn.fail_closed ? "refusing the command" :
		  "the command runs unchecked");
	conn.timeout_logged_at = ioloop_time;
}

const char *const *hooks_conn_request(const char *line, const char *word,
				      unsigned int sid, unsigned int cid,
				      const char **why_r)
{
	const char *const *fields;
	struct timeval deadline;
	struct pollfd pfd;
	int left;

	if (!hooks_conn_connect()) {
		*why_r = "hook server unavailable";
		return NULL;
	}
	i_gettimeofday(&deadline);
	timeval_add_msecs(&deadline, conn.timeout_msecs);

	conn_queue(line, strlen(line), TRUE);
	/* The request must leave before its reply can come. */
	while (conn.fd != -1 && conn.output->used > 0) {
		if ((left = conn_msecs_left(&deadline)) <= 0)
			break;
		pfd.fd = conn.fd;
		pfd.events = POLLOUT;
		if (poll(&pfd, 1, left) > 0)
			(void)conn_flush();
	}
	while (conn.fd != -1) {
		while (conn.fd != -1 && (fields = conn_next_line()) != NULL) {
			if (conn_reply_matches(fields, word, sid, cid))
				return fields;
			if (fields[0] != NULL)
				conn.line_cb(fields);
		}
		if (conn.fd == -1)
			break;
		if ((left = conn_msecs_left(&deadline)) <= 0) {
			conn_timed_out(word);
			*why_r = "timeout";
			return NULL;
		}
		pfd.fd = conn.fd;
		pfd.events = POLLIN;
		if (poll(&pfd, 1, left) > 0)
			(void)conn_read();
	}
	*why_r = "hook server unavailable";
	return NULL;
}

bool hooks_conn_fail_closed(void)
{
	return conn.fail_closed;
}

bool hooks_conn_initialized(void)
{
	return conn.path != NULL;
}

void hooks_conn_init(const char *socket_path, unsigned int timeout_msecs,
		     bool fail_closed, hooks_conn_line_callback_t *line_cb,
		     hooks_conn_connected_callback_t *connected_cb)
{
	conn.path = i_strdup(socket_path);
	conn.timeout_msecs = timeout_msecs;
	conn.fail_closed = fail_closed;
	conn.line_cb = line_cb;
	conn.connected_cb = connected_cb;
	conn.input = buffer_create_dynamic(default_pool, 1024);
	conn.output = buffer_create_dynamic(default_pool, 1024);
}

void hooks_conn_deinit(void)
{
	if (conn.path == NULL)
		return;
	/* Records still buffered get one last chance to leave. */
	if (conn.fd != -1 && conn.output->used > 0)
		(void)conn_flush();
	conn_close();
	buffer_free(&conn.input);
	buffer_free(&conn.output);
	i_free(conn.path);
}
