// The fedland server's MongoDB account: readWrite on its own database, nothing else.
// The mongo image runs this once, as root, when the mongo-data volume is first
// initialised (/docker-entrypoint-initdb.d); compose.yaml mounts it there and
// passes MONGO_APP_USER, MONGO_APP_PASSWORD and MONGO_APP_DB (= FEDLAND_DB).
const name = process.env.MONGO_APP_DB;
const user = process.env.MONGO_APP_USER;
const password = process.env.MONGO_APP_PASSWORD;
if (!name || !user || !password) {
  throw new Error("create-app-user.js: MONGO_APP_DB, MONGO_APP_USER and MONGO_APP_PASSWORD must be set");
}
db.getSiblingDB(name).createUser({ user: user, pwd: password, roles: [{ role: "readWrite", db: name }] });
print(`create-app-user.js: created ${user} with readWrite on ${name}`);
