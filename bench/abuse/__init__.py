"""
Abuse load test (hand-run, never part of the test suite): our server under
thousands of slow and hostile clients while a well-behaved client keeps
sending mail, with the well-behaved latency, the server's memory and CPU,
and what the server did to each kind of abuser.

    .venv/bin/python -m bench.abuse            # 2,000 slow-loris + 20 never-readers, 120 s; then the shedding phase
    .venv/bin/python -m bench.abuse --quick    # 500 + 5, 45 s; smaller shedding phase (about 2 minutes)
    .venv/bin/python -m bench.abuse --help     # counts, mix, durations, timeouts

Phase "hold": our server (L{bench.peers.MailServerPeer}: loopback, a
temporary data folder, the users bob, slow, flood and sink @localhost) with
C{limits.max_connections} and C{max_connections_per_client} raised so every
connection from 127.0.0.1 is admitted, otherwise its defaults
(C{smtp_command_timeout} 300 s, C{smtp_data_timeout} 600 s: the slow
clients stay connected while we measure, unless C{--command-timeout} /
C{--data-timeout} say otherwise).  Stages:

 1. baseline: the well-behaved clients alone (C{--baseline} s);
 2. ramp: C{--slow} slow-loris clients connect (C{--mix}): half in command
    state (EHLO, then an endless command line, one octet every 2-5 s), half
    in DATA (MAIL, RCPT, DATA, then message text, one octet every 2-5 s);
 3. noread flood: C{--noread} clients connect, pipeline C{--noops} NOOPs
    each and never read a reply (not even the greeting); the stage ends
    when nothing moves on their connections any more (the server has
    stopped reading from them, or read it all);
 4. measure (C{--duration} s), with everyone above still connected, plus:
    a brute-force AUTH guesser (AUTH PLAIN, wrong passwords for a real user,
    one try per new connection, C{--bf-workers} connections at once, all
    from C{--bf-source}; loopback, where the server allows AUTH without
    TLS), RCPT floods (MAIL + 1,000 pipelined RCPTs: the server takes
    C{max_recipients}, 100, then says 452) and huge headers (DATA with
    C{--huge-mb} MiB of header lines and no blank line).

Throughout, in a process of its own (so the load generator's busy event
loop does not add to what it measures): the well-behaved client sends a
1 KiB message to bob@localhost every ~100 ms, each over a new connection
(connect, EHLO, MAIL, RCPT, DATA, QUIT), timing connect() to the 250 after
the message and each step on the way; a POP3 client logs in and STATs every
few seconds.  Every second: the server's RSS (VmRSS of its session) and CPU,
its open files and threads, the machine's CPU and dirty page cache, a timed
1 KiB fsync on the same file system.

Phase "shed" (skipped with C{--no-shed}): a fresh server with small
C{smtp_command_timeout} / C{smtp_data_timeout}, C{--shed-slow} slow-loris
and C{--shed-noread} never-readers, and a check that the server closes each
of them with 421 4.4.2 when its deadline passes, and not before.

After each phase: every message the well-behaved client had accepted is
looked up (by the queue id in its 250) in bob's Maildir, and the server's
log is scanned for warnings, errors and tracebacks.

The modules, one per attack family, all talking SMTP through
L{bench.smtp_client}: L{slow_loris}, L{never_read}, L{brute_force},
L{rcpt_flood}, L{huge_header}; the well-behaved clients in
L{well_behaved}; a phase's state and course in L{phase}, what it samples in
L{sampling} and L{system}, its report in L{report}; the command line in
C{__main__}.
"""
