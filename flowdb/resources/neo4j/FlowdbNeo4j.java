// flowdb's managed local Neo4j: the community DBMS run embedded with its Bolt
// connector on loopback, so drivers reach it exactly like a server install.
// Run compiled (flowdb.store.launcher) or as a single-file source program:
//   java -cp "lib/*" FlowdbNeo4j.java HOME PORT PAGECACHE_BYTES PASSWORD_FILE IMPORT_DIR
// The password is read from PASSWORD_FILE, never passed on the command line.
//   java -cp ... FlowdbNeo4j --train SCRATCH
// starts and stops a throw-away store, so the JVM can archive the classes a start loads.
import inet.ipaddr.IPAddressString;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.List;
import java.util.Map;
import org.neo4j.configuration.Config;
import org.neo4j.configuration.GraphDatabaseInternalSettings;
import org.neo4j.configuration.GraphDatabaseSettings;
import org.neo4j.configuration.connectors.BoltConnector;
import org.neo4j.configuration.connectors.BoltConnectorInternalSettings;
import org.neo4j.configuration.helpers.SocketAddress;
import org.neo4j.dbms.api.DatabaseManagementService;
import org.neo4j.dbms.api.DatabaseManagementServiceBuilder;
import org.neo4j.internal.kernel.api.connectioninfo.ClientConnectionInfo;
import org.neo4j.internal.kernel.api.security.AuthenticationResult;
import org.neo4j.io.fs.DefaultFileSystemAbstraction;
import org.neo4j.kernel.api.security.AuthManager;
import org.neo4j.kernel.api.security.AuthToken;
import org.neo4j.kernel.impl.security.User;
import org.neo4j.kernel.internal.GraphDatabaseAPI;
import org.neo4j.logging.NullLogProvider;
import org.neo4j.memory.EmptyMemoryTracker;
import org.neo4j.server.security.SecureHasher;
import org.neo4j.server.security.SystemGraphCredential;
import org.neo4j.server.security.auth.CommunitySecurityModule;
import org.neo4j.server.security.auth.FileUserRepository;

public class FlowdbNeo4j {
    public static void main(String[] args) throws Exception {
        if (args.length == 2 && args[0].equals("--train")) {
            train(Path.of(args[1]));
            return;
        }
        Path home = Path.of(args[0]);
        int port = Integer.parseInt(args[1]);
        long pageCache = Long.parseLong(args[2]);
        String password = Files.readString(Path.of(args[3])).strip();
        Path importDir = Path.of(args[4]);

        long t1;
        Path initialUsers = isFresh(home) ? initialUsersFile(home) : null;
        if (initialUsers != null) {
            // No system database yet: it takes the password from the initial user file
            // (as neo4j-admin dbms set-initial-password writes it) when it is created,
            // so neo4j never has the default password and one start is enough.
            long t0 = System.nanoTime();
            writeInitialPassword(initialUsers, password);
            t1 = System.nanoTime();
            System.out.printf("flowdb-neo4j password of neo4j set for the new store in %.1f s%n",
                              (t1 - t0) / 1e9);
        } else {
            t1 = checkPasswordWithBoltOff(home, pageCache, importDir, password, args[3]);
        }

        // Phase 2: the DBMS, now reachable on loopback with the password.
        DatabaseManagementService dbms = builder(home, pageCache, importDir)
            .setConfig(BoltConnector.enabled, true)
            .setConfig(BoltConnector.listen_address, new SocketAddress("127.0.0.1", port))
            // On stop the databases close first (transactions end or roll back), so Bolt's
            // own waits for idle threads and connections (5 s each) only delay the exit.
            .setConfig(BoltConnectorInternalSettings.thread_pool_shutdown_wait_time, Duration.ZERO)
            .setConfig(BoltConnectorInternalSettings.connection_shutdown_wait_time, Duration.ZERO)
            .build();
        Runtime.getRuntime().addShutdownHook(new Thread(dbms::shutdown));
        if (initialUsers != null) {
            if (!hasPassword(dbms, password)) {  // never leave a store with another password up
                System.out.println("flowdb-neo4j the new store did not take the password in " + args[3]);
                System.exit(1);
            }
            Files.deleteIfExists(initialUsers);  // taken: the system database holds it now
        }
        System.out.printf("flowdb-neo4j ready on bolt://127.0.0.1:%d in %.1f s%n",
                          port, (System.nanoTime() - t1) / 1e9);
        Thread.currentThread().join();
    }

    /** Phase 1, for a store that exists: check (or give) neo4j the password with Bolt off;
     *  returns when it ended. */
    static long checkPasswordWithBoltOff(Path home, long pageCache, Path importDir, String password,
                                         String passwordFile) {
        // Bolt off: nobody can connect while the user neo4j may still have the default
        // password neo4j/neo4j (a store from before auth, or one whose system database
        // was replaced).
        long t0 = System.nanoTime();
        DatabaseManagementService offline = builder(home, pageCache, importDir)
            .setConfig(BoltConnector.enabled, false)
            .build();
        // flowdb neo4j stop may come in this phase too: close the DBMS cleanly then as well.
        Thread closeOffline = new Thread(offline::shutdown);
        Runtime.getRuntime().addShutdownHook(closeOffline);
        boolean changed = false;
        String failure = null;
        try {
            changed = setPassword(offline, password);
        } catch (Exception e) {
            failure = String.valueOf(e.getMessage()).strip().split("\n")[0];
        } finally {
            offline.shutdown();
        }
        Runtime.getRuntime().removeShutdownHook(closeOffline);
        if (failure != null) {  // one line, the last of the log: flowdb shows it to the user
            System.out.println("flowdb-neo4j could not give neo4j the password in " + passwordFile
                               + ": " + failure);
            System.exit(1);
        }
        long t1 = System.nanoTime();
        System.out.printf("flowdb-neo4j password of neo4j %s with Bolt off in %.1f s%n",
                          changed ? "set" : "checked", (t1 - t0) / 1e9);
        return t1;
    }

    /** What a start and a first write and read load, on a throw-away store: Bolt on an
     *  ephemeral loopback port, a random password that is never written anywhere else. */
    static void train(Path scratch) throws Exception {
        String password = java.util.UUID.randomUUID().toString();
        writeInitialPassword(initialUsersFile(scratch), password);
        DatabaseManagementService dbms = builder(scratch, 32L << 20, scratch.resolve("import"))
            .setConfig(BoltConnector.enabled, true)
            .setConfig(BoltConnector.listen_address, new SocketAddress("127.0.0.1", 0))
            .build();
        try {
            setPassword(dbms, password);
            var db = dbms.database(GraphDatabaseSettings.DEFAULT_DATABASE_NAME);
            db.executeTransactionally("CREATE CONSTRAINT k IF NOT EXISTS FOR (n:T) REQUIRE n.key IS UNIQUE");
            db.executeTransactionally("UNWIND range(1, 100) AS i MERGE (n:T {key: i}) SET n.v = i");
            db.executeTransactionally("MATCH (n:T) WHERE n.key < $k RETURN count(n) AS n", Map.of("k", 10));
        } finally {
            dbms.shutdown();
        }
    }

    /** A store never started: no system database, so nothing holds a password yet. */
    static boolean isFresh(Path home) {
        Path data = home.resolve("data");
        return !Files.exists(data.resolve("databases").resolve("system"))
            && !Files.exists(data.resolve("transactions").resolve("system"));
    }

    /** The initial user file (data/dbms/auth.ini) the system database reads when it is created. */
    static Path initialUsersFile(Path home) {
        Config config = Config.newBuilder().set(GraphDatabaseSettings.neo4j_home, home.toAbsolutePath()).build();
        return CommunitySecurityModule.getInitialUserRepositoryFile(config);
    }

    /** That file with one user, neo4j, with this password and no change required. */
    static void writeInitialPassword(Path file, String password) throws Exception {
        var fs = new DefaultFileSystemAbstraction();
        Files.createDirectories(file.getParent());
        Files.deleteIfExists(file);
        var users = new FileUserRepository(fs, file, NullLogProvider.getInstance(), EmptyMemoryTracker.INSTANCE);
        users.start();
        try {
            var credential = SystemGraphCredential.createCredentialForPassword(
                password.getBytes(java.nio.charset.StandardCharsets.UTF_8), new SecureHasher());
            users.create(new User("neo4j", null, credential, false, false));
        } finally {
            users.shutdown();
        }
    }

    static DatabaseManagementServiceBuilder builder(Path home, long pageCache, Path importDir) {
        return new DatabaseManagementServiceBuilder(home)
            .setConfig(GraphDatabaseSettings.auth_enabled, true)
            // No lock-out after failed logins: the generated password cannot be
            // guessed, and a lock-out would let any local user shut flowdb out.
            .setConfig(GraphDatabaseSettings.auth_max_failed_attempts, 0)
            .setConfig(GraphDatabaseSettings.pagecache_memory, pageCache)
            // LOAD CSV reads no local files (and only an empty import directory)...
            .setConfig(GraphDatabaseSettings.allow_file_urls, false)
            .setConfig(GraphDatabaseSettings.load_csv_file_url_root, importDir)
            // ...and fetches no URL: every IPv4 and IPv6 address is blocked.
            .setConfig(GraphDatabaseInternalSettings.cypher_ip_blocklist,
                       List.of(new IPAddressString("0.0.0.0/0"), new IPAddressString("::/0")));
    }

    /** Whether neo4j logs in with this password, no change required (as Bolt would log in). */
    static boolean hasPassword(DatabaseManagementService dbms, String password) throws Exception {
        var system = (GraphDatabaseAPI) dbms.database(GraphDatabaseSettings.SYSTEM_DATABASE_NAME);
        var login = system.getDependencyResolver().resolveDependency(AuthManager.class)
            .login(AuthToken.newBasicAuthToken("neo4j", password), ClientConnectionInfo.EMBEDDED_CONNECTION);
        return login.subject().getAuthenticationResult() == AuthenticationResult.SUCCESS;
    }

    /** Give the user neo4j this password unless it has it already; true if it changed. */
    static boolean setPassword(DatabaseManagementService dbms, String password) throws Exception {
        // The first Cypher statement of a JVM costs seconds: ALTER USER only when needed.
        if (hasPassword(dbms, password)) {
            return false;
        }
        var system = (GraphDatabaseAPI) dbms.database(GraphDatabaseSettings.SYSTEM_DATABASE_NAME);
        try {
            system.executeTransactionally(
                "ALTER USER neo4j SET PASSWORD $pw CHANGE NOT REQUIRED", Map.of("pw", password));
        } catch (RuntimeException e) {
            // Neo4j refuses to "change" a password to the one already set.
            if (!String.valueOf(e.getMessage()).contains("cannot be the same")) {
                throw e;
            }
            system.executeTransactionally("ALTER USER neo4j SET PASSWORD CHANGE NOT REQUIRED");
        }
        return true;
    }
}
