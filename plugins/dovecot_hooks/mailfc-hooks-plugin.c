/* mailfc-hooks-plugin.c: mailfc's Dovecot IMAP hook plugin.

NAME
	mailfc_hooks - record every IMAP session and command, enforce IMAP limits

SUMMARY
	protocol imap {
	  mail_plugins = $mail_plugins mailfc_hooks
	}
	plugin {
	  mailfc_hooks_socket = /run/mailfc/hooks.sock
	}

DESCRIPTION
	Loaded into Dovecot's imap process (binary dependency "imap"; LOGIN
	happens before, in imap-login and at mailfc's IMAP Router).  For each
	IMAP session it talks to the mailfc hook server over a unix socket with
	the line protocol of README.md (mailfc/policy/hooks/protocol.py):

	session start   SESSION: the server records the session and may refuse
			it (concurrent sessions, admin block): the client then
			gets "* BYE [LIMIT] <reason>" and is disconnected.  The
			reply names the commands to ask about ("watch").
	command start   the first command_hook pre call of a command (the pre
			hook runs again for each execution slice of a long
			command; later ones are ignored).  Arguments are not
			parsed yet, so the decision uses the user, the command
			name (UID commands resolved by peeking at the next word
			of input) and the tag.  Watched commands are asked with
			CMD; a refused one gets its cmd->func replaced by one
			that consumes the arguments (literals too: a synchronising
			literal is never invited with "+", a non-synchronising one
			is read and thrown away) and answers "NO [LIMIT] ...".
	command end     the client's send_tagline is overridden, so every
			tagged reply is seen, also those sent outside
			command_exec() (parse errors, cancelled commands): DONE
			with tag, name, duration, reply and argument summary.
	session end     the client's destroy is overridden: END with bytes in
			and out.

CONFIGURATION (plugin settings)
	mailfc_hooks_socket          the hook server's socket (required)
	mailfc_hooks_timeout_msecs   how long to wait for an answer (500)
	mailfc_hooks_failure         "open" (default): when the server is down or
				     slow, commands run unchecked and unrecorded;
				     "closed": they are refused with
				     "NO [UNAVAILABLE]" (LOGOUT, CAPABILITY and
				     NOOP always run)
	The hook server's HELLO line overrides the last two (mailfc's [hooks]
	section), so they are set in one place.

DIAGNOSTICS
	Dovecot's log, prefix "mailfc_hooks:": why the server is unavailable and
	which failure policy applies, when it is back, timeouts (rate-limited).

SEE ALSO
	mailfc-hooks-conn.c (the socket), README.md (the protocol),
	mailfc/policy/hooks/ (the server).
*/

#include "imap-common.h"
#include "llist.h"
#include "str.h"
#include "strescape.h"
#include "ioloop.h"
#include "istream.h"
#include "ostream.h"
#include "net.h"
#include "module-context.h"
#include "mail-user.h"
#include "imap-commands.h"
#include "imap-parser.h"
#include "time-util.h"

#include "mailfc-hooks-protocol.h"
#include "mailfc-hooks-conn.h"

#include <ctype.h>
#include <sys/time.h>

#define LOG_PREFIX "mailfc_hooks: "
#define DEFAULT_TIMEOUT_MSECS 500
#define UNAVAILABLE_REPLY "NO [" MAILFC_HOOKS_CODE_UNAVAILABLE "] " \
	"The mail policy service is not available; try again later."

#define HOOKS_CONTEXT(obj) MODULE_CONTEXT(obj, mailfc_hooks_imap_module)

/* Commands of one name that may run without asking until until_usecs. */
#define HOOKS_GRANT_SLOTS 8
struct hooks_grant {
	char name[32];
	unsigned int left;
	uint64_t until_usecs;
};

struct hooks_client {
	union imap_module_context module_ctx;
	struct client *client;
	struct hooks_client *prev, *next;

	unsigned int sid, last_cid;
	uint64_t start_usecs;
	/* Commands to ask about: NULL unknown (ask about all), "" none,
	   "*" all, else ",NAME,NAME," for strstr(). */
	char *watch;
	/* Commands the server counted already (CMD ... OK grant), per name. */
	struct hooks_grant grants[HOOKS_GRANT_SLOTS];
	/* Bytes from and to the client, the highest offsets seen: the input
	   stream's offset does not survive Dovecot closing it at LOGOUT. */
	uint64_t bytes_in, bytes_out;
	/* Being announced by hooks_session_start() right now. */
	bool starting;
};

struct hooks_command {
	union imap_module_context module_ctx;
	unsigned int cid;
	uint64_t start_usecs;
	const char *name;
	/* Set when refused: the tagged reply, and a non-synchronising
	   literal's bytes still to skip. */
	const char *refusal;
	uoff_t skip;
	bool recorded;
};

const char *mailfc_hooks_plugin_version = DOVECOT_ABI_VERSION;
const char mailfc_hooks_plugin_binary_dependency[] = "imap";

void mailfc_hooks_plugin_init(struct module *module);
void mailfc_hooks_plugin_deinit(void);

static MODULE_CONTEXT_DEFINE_INIT(mailfc_hooks_imap_module,
				  &imap_module_register);
static struct module *hooks_module;
static imap_client_created_func_t *next_hook_client_created;
static struct hooks_client *hooks_clients;
static unsigned int hooks_last_sid;
static const char *const always_allowed[] = MAILFC_HOOKS_ALWAYS_ALLOWED;

static uint64_t now_usecs(void)
{
	struct timeval tv;

	i_gettimeofday(&tv);
	return (uint64_t)tv.tv_sec * 1000000 + tv.tv_usec;
}

static void append_field(string_t *line, const char *value, size_t max)
{
	str_append_c(line, '\t');
	if (value == NULL)
		return;
	if (strlen(value) > max)
		value = t_strndup(value, max);
	str_append_tabescaped(line, value);
}

static void hooks_set_watch(struct hooks_client *hc, const char *watch)
{
	/* The limits changed: what was granted under the old ones is void. */
	memset(hc->grants, 0, sizeof(hc->grants));
	i_free(hc->watch);
	if (strcmp(watch, MAILFC_HOOKS_WATCH_NONE) == 0)
		hc->watch = i_strdup("");
	else if (strcmp(watch, MAILFC_HOOKS_WATCH_ALL) == 0)
		hc->watch = i_strdup(MAILFC_HOOKS_WATCH_ALL);
	else
		hc->watch = i_strconcat(",", watch, ",", NULL);
}

static bool hooks_watches(const struct hooks_client *hc, const char *name)
{
	if (hc->watch == NULL || strcmp(hc->watch, MAILFC_HOOKS_WATCH_ALL) == 0)
		return TRUE;
	return strstr(hc->watch, t_strconcat(",", name, ",", NULL)) != NULL;
}

static void hooks_count_bytes(struct hooks_client *hc)
{
	struct client *client = hc->client;
	uint64_t in = i_stream_get_absolute_offset(client->input);

	if (in > hc->bytes_in)
		hc->bytes_in = in;
	if (client->output->offset > hc->bytes_out)
		hc->bytes_out = client->output->offset;
}

static bool hooks_always_allowed(const char *name)
{
	unsigned int i;

	for (i = 0; always_allowed[i] != NULL; i++) {
		if (strcmp(always_allowed[i], name) == 0)
			return TRUE;
	}
	return FALSE;
}

static struct hooks_client *hooks_find(const char *sid_text)
{
	struct hooks_client *hc;
	unsigned int sid;

	if (sid_text == NULL || str_to_uint(sid_text, &sid) < 0)
		return NULL;
	for (hc = hooks_clients; hc != NULL; hc = hc->next) {
		if (hc->sid == sid)
			return hc;
	}
	return NULL;
}

/* -- lines nobody waits for ------------------------------------------------ */

static void hooks_line(const char *const *fields)
{
	struct hooks_client *hc;

	if (strcmp(fields[0], MAILFC_HOOKS_WATCH) == 0 ||
	    strcmp(fields[0], MAILFC_HOOKS_SESSION) == 0) {
		/* WATCH sid watch | SESSION sid OK watch (a resumed session) */
		unsigned int at = strcmp(fields[0], MAILFC_HOOKS_WATCH) == 0 ? 2 : 3;
		if (str_array_length(fields) <= at ||
		    (at == 3 && strcmp(fields[2], MAILFC_HOOKS_OK) != 0))
			return;
		if ((hc = hooks_find(fields[1])) != NULL)
			hooks_set_watch(hc, fields[at]);
	} else if (strcmp(fields[0], MAILFC_HOOKS_ERROR) == 0) {
		i_warning(LOG_PREFIX "the hook server refused a line: %s",
			  fields[1] == NULL ? "" : fields[1]);
	}
	/* Anything else is the late reply of a timed-out request. */
}

static const char *hooks_session_line(struct hooks_client *hc, bool resumed)
{
	struct mail_user *user = hc->client->user;
	string_t *line = t_str_new(128);

	str_printfa(line, MAILFC_HOOKS_SESSION "\t%u\t%llu", hc->sid,
		    (unsigned long long)hc->start_usecs);
	append_field(line, user->username, 256);
	append_field(line, user->conn.remote_ip == NULL ? "" :
		     net_ip2addr(user->conn.remote_ip), 64);
	str_printfa(line, "\t%d\n", resumed ? 1 : 0);
	return str_c(line);
}

/* A new connection: the server (maybe restarted) knows none of the live
   sessions, so each is announced again, except the one starting now. */
static void hooks_connected(void)
{
	struct hooks_client *hc;

	for (hc = hooks_clients; hc != NULL; hc = hc->next) {
		if (!hc->starting)
			hooks_conn_send(hooks_session_line(hc, TRUE));
	}
}

/* -- refusing a command ------------------------------------------------------ */

static const struct imap_arg *hooks_last_arg(const struct imap_arg *args)
{
	const struct imap_arg *last = NULL, *list, *inner;

	for (; !IMAP_ARG_IS_EOL(args); args++)
		last = args;
	if (last != NULL && imap_arg_get_list(last, &list) &&
	    (inner = hooks_last_arg(list)) != NULL)
		return inner;
	return last;
}

/* Replaces cmd->func of a refused command: reads the rest of the command
   without acting on it, so the connection stays in step, then answers. */
static bool hooks_cmd_refused(struct client_command_context *cmd)
{
	struct hooks_command *hcmd = HOOKS_CONTEXT(cmd);
	struct client *client = cmd->client;
	const struct imap_arg *args, *last;
	size_t size;
	int ret;

	for (;;) {
		while (hcmd->skip > 0) {
			size = i_stream_get_data_size(client->input);
			if (size == 0) {
				if (client->input->closed) {
					cmd->state = CLIENT_COMMAND_STATE_DONE;
					return TRUE;
				}
				cmd->state = CLIENT_COMMAND_STATE_WAIT_INPUT;
				return FALSE;
			}
			if (size > hcmd->skip)
				size = hcmd->skip;
			i_stream_skip(client->input, size);
			hcmd->skip -= size;
			if (hcmd->skip == 0)
				imap_parser_reset(cmd->parser);
		}
		ret = imap_parser_read_args(cmd->parser, 0,
					    IMAP_PARSE_FLAG_LITERAL_SIZE |
					    IMAP_PARSE_FLAG_LITERAL8, &args);
		if (ret == -2) {
			if (client->input->closed) {
				cmd->state = CLIENT_COMMAND_STATE_DONE;
				return TRUE;
			}
			cmd->state = CLIENT_COMMAND_STATE_WAIT_INPUT;
			return FALSE;
		}
		if (ret == -1) {
			/* Unparsable rest: drop the line, as Dovecot does
			   after a syntax error. */
			client->input_skip_line = TRUE;
			break;
		}
		last = hooks_last_arg(args);
		if (last == NULL || (last->type != IMAP_ARG_LITERAL_SIZE &&
				     last->type != IMAP_ARG_LITERAL_SIZE_NONSYNC))
			break;	/* the whole line is read */
		if (last->type == IMAP_ARG_LITERAL_SIZE) {
			/* The client waits for "+" before sending the literal
			   and gets the refusal instead.  The parser has eaten
			   the CRLF after "{size}" already: Dovecot must not skip
			   a line (it would eat the client's next command). */
			client->input_skip_line = FALSE;
			break;
		}
		hcmd->skip = imap_arg_as_literal_size(last);
		if (hcmd->skip == 0)
			imap_parser_reset(cmd->parser);
	}
	client_send_tagline(cmd, hcmd->refusal);
	return TRUE;
}

/* -- the command hooks ------------------------------------------------------ */

/* The command's name, UID commands with their sub-command ("UID FETCH"):
   at the first pre hook the input still holds the rest of the line. */
static const char *hooks_command_name(struct client_command_context *cmd)
{
	const unsigned char *data;
	size_t size, start = 0, end;

	if (cmd->name == NULL)
		return "";
	if (strcasecmp(cmd->name, "UID") != 0)
		return t_str_ucase(cmd->name);
	data = i_stream_get_data(cmd->client->input, &size);
	while (start < size && data[start] == ' ')
		start++;
	for (end = start; end < size && i_isalpha(data[end]); end++) ;
	if (end == start || end == size)
		return "UID";
	return t_str_ucase(t_strdup_printf("UID %s",
		t_strndup(data + start, end - start)));
}

/* The slot of `name`, or (create) an unused or expired one to take it. */
static struct hooks_grant *
hooks_grant_slot(struct hooks_client *hc, const char *name, bool create)
{
	struct hooks_grant *free_slot = NULL;
	uint64_t now = now_usecs();
	unsigned int i;

	for (i = 0; i < HOOKS_GRANT_SLOTS; i++) {
		struct hooks_grant *slot = &hc->grants[i];
		if (strcmp(slot->name, name) == 0)
			return slot;
		if (free_slot == NULL && (slot->left == 0 || now >= slot->until_usecs))
			free_slot = slot;
	}
	return create ? free_slot : NULL;
}

/* A granted command of this name left: use it. */
static bool hooks_use_grant(struct hooks_client *hc, const char *name)
{
	struct hooks_grant *slot = hooks_grant_slot(hc, name, FALSE);

	if (slot == NULL || slot->left == 0 || now_usecs() >= slot->until_usecs)
		return FALSE;
	slot->left--;
	return TRUE;
}

/* CMD ... OK grant: the next `grant` commands of this name run unasked.  With
   every slot busy the grant is not kept: those commands are asked about (and
   were counted once more, which the server's grant sizes bound). */
static void hooks_take_grant(struct hooks_client *hc, const char *name,
			     const char *grant)
{
	struct hooks_grant *slot;
	unsigned int count;

	if (grant == NULL || str_to_uint(grant, &count) < 0 || count == 0 ||
	    strlen(name) >= sizeof(slot->name))
		return;
	if ((slot = hooks_grant_slot(hc, name, TRUE)) == NULL)
		return;
	i_strocpy(slot->name, name, sizeof(slot->name));
	slot->left = count;
	slot->until_usecs = now_usecs() + (uint64_t)MAILFC_HOOKS_GRANT_MSECS * 1000;
}

/* NULL: the command runs; else the tagged reply that refuses it. */
static const char *hooks_decide(struct hooks_client *hc,
				struct hooks_command *hcmd, const char *tag)
{
	const char *const *reply, *why;
	string_t *line;

	if (hooks_always_allowed(hcmd->name))
		return NULL;
	if (!hooks_conn_connect())
		return hooks_conn_fail_closed() ? UNAVAILABLE_REPLY : NULL;
	if (!hooks_watches(hc, hcmd->name))
		return NULL;
	if (hooks_use_grant(hc, hcmd->name))
		return NULL;

	line = t_str_new(128);
	str_printfa(line, MAILFC_HOOKS_CMD "\t%u\t%u", hc->sid, hcmd->cid);
	append_field(line, hcmd->name, 64);
	append_field(line, tag, 128);
	str_append_c(line, '\n');
	reply = hooks_conn_request(str_c(line), MAILFC_HOOKS_CMD, hc->sid,
				   hcmd->cid, &why);
	if (reply == NULL)
		return hooks_conn_fail_closed() ? UNAVAILABLE_REPLY : NULL;
	if (reply[3] != NULL && strcmp(reply[3], MAILFC_HOOKS_NO) == 0)
		return t_strconcat("NO ", reply[4] == NULL ? "" : reply[4], NULL);
	hooks_take_grant(hc, hcmd->name, reply[3] == NULL ? NULL : reply[4]);
	return NULL;
}

static void hooks_command_pre(struct client_command_context *cmd)
{
	struct hooks_client *hc = HOOKS_CONTEXT(cmd->client);
	struct hooks_command *hcmd;

	if (hc == NULL || HOOKS_CONTEXT(cmd) != NULL)
		return;		/* not ours, or a later execution slice */

	hooks_count_bytes(hc);
	hcmd = p_new(cmd->pool, struct hooks_command, 1);
	hcmd->cid = ++hc->last_cid;
	hcmd->start_usecs = now_usecs();
	MODULE_CONTEXT_SET(cmd, mailfc_hooks_imap_module, hcmd);
	T_BEGIN {
		const char *refusal;

		hcmd->name = p_strdup(cmd->pool, hooks_command_name(cmd));
		refusal = hooks_decide(hc, hcmd, cmd->tag);
		if (refusal != NULL) {
			hcmd->refusal = p_strdup(cmd->pool, refusal);
			cmd->func = hooks_cmd_refused;
		}
	} T_END;
}

static void hooks_command_post(struct client_command_context *cmd ATTR_UNUSED)
{
	/* Results are taken where they are sent (send_tagline). */
}

/* -- the client overrides --------------------------------------------------- */

static void hooks_record(struct client_command_context *cmd, const char *reply)
{
	struct hooks_client *hc = HOOKS_CONTEXT(cmd->client);
	struct hooks_command *hcmd = HOOKS_CONTEXT(cmd);
	uint64_t now = now_usecs(), start;
	unsigned int cid;
	string_t *line;

	if (hcmd != NULL) {
		if (hcmd->recorded)
			return;
		hcmd->recorded = TRUE;
		cid = hcmd->cid;
		start = hcmd->start_usecs;
	} else {
		/* Answered before it ran: a syntax error, an unknown command. */
		cid = ++hc->last_cid;
		start = now;
	}
	line = t_str_new(256);
	str_printfa(line, MAILFC_HOOKS_DONE "\t%u\t%u\t%llu\t%llu", hc->sid, cid,
		    (unsigned long long)start,
		    (unsigned long long)(now > start ? now - start : 0));
	append_field(line, hcmd != NULL ? hcmd->name :
		     (cmd->name == NULL ? "" : t_str_ucase(cmd->name)), 64);
	append_field(line, cmd->tag, 128);
	append_field(line, reply, MAILFC_HOOKS_MAX_REPLY);
	append_field(line, cmd->human_args != NULL ? cmd->human_args : cmd->args,
		     MAILFC_HOOKS_MAX_ARGS);
	str_append_c(line, '\n');
	hooks_conn_send(str_c(line));
}

static void hooks_send_tagline(struct client_command_context *cmd,
			       const char *data)
{
	struct hooks_client *hc = HOOKS_CONTEXT(cmd->client);

	T_BEGIN {
		hooks_record(cmd, cmd->cancel ? "NO Command cancelled." : data);
	} T_END;
	hc->module_ctx.super.send_tagline(cmd, data);
	hooks_count_bytes(hc);
}

static void hooks_client_destroy(struct client *client, const char *reason)
{
	struct hooks_client *hc = HOOKS_CONTEXT(client);
	char *line, *watch = hc->watch;

	hooks_count_bytes(hc);
	T_BEGIN {
		string_t *str = t_str_new(128);

		str_printfa(str, MAILFC_HOOKS_END "\t%u\t%llu\t%llu", hc->sid,
			    (unsigned long long)hc->bytes_in,
			    (unsigned long long)hc->bytes_out);
		append_field(str, reason != NULL ? reason :
			     (client->logged_out ? "Logged out" : "Disconnected"), 256);
		str_append_c(str, '\n');
		line = i_strdup(str_c(str));
	} T_END;
	DLLIST_REMOVE(&hooks_clients, hc);
	/* Destroying cancels queued commands, whose replies are recorded
	   first; END goes last.  hc is freed with the client. */
	hc->module_ctx.super.destroy(client, reason);
	T_BEGIN {
		hooks_conn_send(line);
	} T_END;
	i_free(line);
	i_free(watch);
}

/* The session starts: announce it; a refused one is disconnected before
   its login is answered. */
static void hooks_session_start(struct hooks_client *hc)
{
	const char *const *reply, *why;

	/* Announced here, not by the connect callback as a resumed one. */
	hc->starting = TRUE;
	if (!hooks_conn_connect()) {
		hc->starting = FALSE;
		return;
	}
	reply = hooks_conn_request(hooks_session_line(hc, FALSE),
				   MAILFC_HOOKS_SESSION, hc->sid, 0, &why);
	hc->starting = FALSE;
	if (reply == NULL || reply[2] == NULL || reply[3] == NULL)
		return;
	if (strcmp(reply[2], MAILFC_HOOKS_OK) == 0)
		hooks_set_watch(hc, reply[3]);
	else
		client_disconnect_with_error(hc->client, reply[3]);
}

static void hooks_client_created(struct client **clientp)
{
	struct client *client = *clientp;
	struct hooks_client *hc;
	const char *path, *value;
	unsigned int timeout = DEFAULT_TIMEOUT_MSECS;

	if (mail_user_is_plugin_loaded(client->user, hooks_module) &&
	    (path = mail_user_plugin_getenv(client->user,
					    "mailfc_hooks_socket")) != NULL &&
	    *path != '\0') {
		if (!hooks_conn_initialized()) {
			value = mail_user_plugin_getenv(client->user,
						"mailfc_hooks_timeout_msecs");
			if (value != NULL && (str_to_uint(value, &timeout) < 0 ||
					      timeout == 0)) {
				i_error(LOG_PREFIX "mailfc_hooks_timeout_msecs=%s: "
					"expected milliseconds > 0; using %u",
					value, DEFAULT_TIMEOUT_MSECS);
				timeout = DEFAULT_TIMEOUT_MSECS;
			}
			value = mail_user_plugin_getenv(client->user,
							"mailfc_hooks_failure");
			hooks_conn_init(path, timeout, value != NULL &&
					strcmp(value, MAILFC_HOOKS_FAILURE_CLOSED) == 0,
					hooks_line, hooks_connected);
		}
		hc = p_new(client->pool, struct hooks_client, 1);
		hc->client = client;
		hc->sid = ++hooks_last_sid;
		hc->start_usecs = now_usecs();
		hc->module_ctx.super = client->v;
		client->v.send_tagline = hooks_send_tagline;
		client->v.destroy = hooks_client_destroy;
		MODULE_CONTEXT_SET(client, mailfc_hooks_imap_module, hc);
		DLLIST_PREPEND(&hooks_clients, hc);
		T_BEGIN {
			hooks_session_start(hc);
		} T_END;
	} else if (mail_user_is_plugin_loaded(client->user, hooks_module)) {
		i_warning(LOG_PREFIX "mailfc_hooks_socket is not set: "
			  "IMAP sessions are neither recorded nor limited");
	}
	if (next_hook_client_created != NULL)
		next_hook_client_created(clientp);
}

void mailfc_hooks_plugin_init(struct module *module)
{
	hooks_module = module;
	command_hook_register(hooks_command_pre, hooks_command_post);
	next_hook_client_created =
		imap_client_created_hook_set(hooks_client_created);
}

void mailfc_hooks_plugin_deinit(void)
{
	command_hook_unregister(hooks_command_pre, hooks_command_post);
	imap_client_created_hook_set(next_hook_client_created);
	hooks_conn_deinit();
}
